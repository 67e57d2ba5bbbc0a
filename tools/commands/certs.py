"""`loyalty certs`: a development CA and one certificate per service (tools/certs.py), then the
LOYALTY_TLS_* environment each service runs with for mutual TLS.

Every service gets its own certificate and key and trusts the one CA; with all three set, a
service serves TLS only, refuses callers without a certificate signed by the CA, and presents its
own certificate when it calls the others. Callers must reach a service by a name its certificate
carries: localhost, 127.0.0.1, the service's name, or a name given with --host.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from libs.settings import get_settings
from tools.certs import CA_DAYS, LEAF_DAYS, SERVICES, CertError, default_directory, generate
from tools.ops import EXIT_OK, EXIT_REFUSED, CommandError, positive_int


def _services(value: str | None) -> list[str]:
    if not value:
        return list(SERVICES)
    wanted = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(SERVICES))
    if unknown or not wanted:
        raise CommandError(f"unknown service(s): {', '.join(unknown) or repr(value)}; "
                           f"choose from {', '.join(SERVICES)}", EXIT_REFUSED)
    return list(dict.fromkeys(wanted))


def _cmd_certs(args: argparse.Namespace) -> int:
    directory = Path(args.dir) if args.dir else default_directory(get_settings())
    try:
        bundle = generate(directory.resolve(), _services(args.services), hosts=args.host or (), force=args.force,
                          ca_days=args.ca_days, leaf_days=args.days)
    except CertError as error:
        raise CommandError(str(error), EXIT_REFUSED) from None
    if args.json:
        print(json.dumps({"directory": str(bundle.directory), "ca_cert": str(bundle.ca_cert),
                          "ca_key": str(bundle.ca_key),
                          "services": {name: bundle.env(name) for name in bundle.services}}, indent=2))
        return EXIT_OK
    names = ", ".join(["localhost", "127.0.0.1", "the service's name", *(args.host or ())])
    print(f"CA {bundle.ca_cert} (key {bundle.ca_key}), valid {args.ca_days} days")
    print(f"one certificate per service, valid {args.days} days, for {names}; keys are 0600")
    print("\nEnvironment of each service (the same CA for all, each its own certificate and key):")
    for name in bundle.services:
        print(f"\n# {name}")
        for variable, value in bundle.env(name).items():
            print(f"export {variable}={shlex.quote(value)}")
    print("\nCallers name each service by one of the names above (LOYALTY_<SERVICE>_ADDR, e.g. 127.0.0.1:port).")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    command = sub.add_parser(
        "certs", help="generate a development CA and a certificate per service for mTLS",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 written, 2 refused (a CA exists without --force, bad input, a directory "
               "that cannot be written)")
    command.add_argument("--dir", help="where to write them (default: <LOYALTY_STATE_DIR>/certs)")
    command.add_argument("--services", help=f"comma-separated subset of {','.join(SERVICES)} (default: all)")
    command.add_argument("--host", action="append", metavar="NAME",
                         help="another DNS name or IP address every certificate carries (repeatable)")
    command.add_argument("--days", type=positive_int, default=LEAF_DAYS, help="validity of the service certificates")
    command.add_argument("--ca-days", type=positive_int, default=CA_DAYS, help="validity of the CA")
    command.add_argument("--force", action="store_true", help="replace an existing CA and every certificate")
    command.add_argument("--json", action="store_true", help="the files and environment as JSON")
    command.set_defaults(func=_cmd_certs)
