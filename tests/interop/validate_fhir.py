#!/usr/bin/env python3
"""Validate FHIR JSON resources with an independent implementation (fhir.resources, R4B models,
which R4 resources satisfy for the types the gateway emits).

    validate_fhir.py FILE [FILE ...]

Each FILE holds one resource (e.g. a searchset Bundle). Exit 0 when every one parses and
validates; else exit 1 naming the file and the validation errors.
"""
import importlib
import json
import sys


def model_for(resource_type: str):
    module = importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}")
    return getattr(module, resource_type)


def main() -> int:
    failed = False
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        try:
            model = model_for(data["resourceType"])
            model.model_validate(data)
        except Exception as e:  # noqa: BLE001 - report whatever the validator says
            print(f"{path}: {data.get('resourceType')}: {e}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
