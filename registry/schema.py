"""``python -m registry.schema [--check] [--out specs/schema.json]``: the JSON Schema of spec files,
generated from the built-in registries (plugins are not included), plus jsonschema validation."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "specs" / "schema.json"


def build_schema() -> dict:
    import zoo  # noqa: F401
    from registry.spec import spec_model

    schema = spec_model().model_json_schema(by_alias=True, mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "fmzoo-spec.schema.json", **schema}


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def validate_with_jsonschema(raw: dict, schema: dict | None = None) -> list[str]:
    """Problems jsonschema finds in a raw spec, as ``path: message`` strings (empty list = valid)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema or build_schema())
    out = []
    for err in sorted(validator.iter_errors(raw), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in err.absolute_path)
        out.append(f"{path or '<root>'}: {err.message}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m registry.schema", description=__doc__)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="fail (exit 1) when the file on disk is stale")
    args = ap.parse_args(argv)
    text = render(build_schema())
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            sys.stderr.write(f"{args.out} is stale; run `python -m registry.schema` to regenerate it\n")
            return 1
        print(f"{args.out} is current")
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
