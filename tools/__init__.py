"""Developer and operator tools: stub generation, the process supervisor and the `loyalty` CLI."""
