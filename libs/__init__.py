"""Code shared by two or more services: settings, database, migrations, the gRPC runtime
(server bootstrap, interceptors, errors, validation, auth), clients, telemetry and logs."""
