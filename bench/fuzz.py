"""A long schemathesis run against a real Relay: every operation of /openapi.json, valid and invalid.

Usage:  .venv/bin/python bench/fuzz.py [--examples 300] [--negative 100] [--seed N]

Starts a throwaway embedded PostgreSQL (or uses DATABASE_URL's server), a fake Replicate API and
`relay serve`, then runs the same checks as tests/test_openapi.py with many more generated
requests per operation. Prints one line per operation and mode, and exits 1 if any failed: the
ceiling is zero failures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import schemathesis  # noqa: E402

from service.web.app import openapi_document  # noqa: E402
from tests.fake_replicate import FakeReplicate, relay_for  # noqa: E402
from tests.fuzzing import can_break, fuzz  # noqa: E402
from tests.support import ADMIN_TOKEN, Postgres  # noqa: E402


def run(schema: schemathesis.BaseSchema, method: str, path: str, examples: int, mode) -> tuple[str, float]:
    started = time.monotonic()
    try:
        fuzz(schema, method, path, examples, ADMIN_TOKEN, mode)
    except (Exception, BaseExceptionGroup) as error:  # noqa: BLE001 - reported; the run goes on
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"FAILED: {first[:90]}", time.monotonic() - started
    return "ok", time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300, help="valid requests per operation")
    parser.add_argument("--negative", type=int, default=100, help="invalid requests per operation")
    options = parser.parse_args()
    document = openapi_document()
    operations = sorted((m, p) for p, methods in document["paths"].items() for m in methods)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        postgres = Postgres(Path(tmp))
        with FakeReplicate() as fake, relay_for(postgres.new_database(), fake) as relay:
            schema = schemathesis.openapi.from_url(relay.url + "/openapi.json")
            print(f"{'operation':<48} {'mode':<9} {'cases':>6} {'seconds':>8}  result")
            for method, path in operations:
                modes = [("valid", options.examples, schemathesis.GenerationMode.POSITIVE)]
                if can_break(document, method, path):
                    modes.append(("invalid", options.negative, schemathesis.GenerationMode.NEGATIVE))
                for name, examples, mode in modes:
                    result, seconds = run(schema, method, path, examples, mode)
                    failures += result != "ok"
                    label = f"{method.upper()} {path}"
                    print(f"{label:<48} {name:<9} {examples:>6} {seconds:>8.1f}  {result}", flush=True)
    print(f"{failures} failed (ceiling: 0)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
