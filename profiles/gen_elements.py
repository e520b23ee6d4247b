#!/usr/bin/env python3
"""Build the element table the validator reads (FHIR R4 4.0.1, StructureDefinition snapshots).

Usage: gen_elements.py DEFINITIONS_DIR OUT_ELEMENTS_JSON_GZ

Reads profiles-resources.json and profiles-types.json from DEFINITIONS_DIR and writes
OUT_ELEMENTS_JSON_GZ, a compact table of every element of every resource and complex
datatype specialization snapshot. Beside it, it writes fhir.schema.json.gz, a gzip of the
unmodified official JSON schema taken from the same directory, and compartments.json.gz, the
official CompartmentDefinition resources (a JSON array) from profiles-resources.json.

Both files are written deterministically (gzip mtime 0, no file name in the header) so a
rerun on the same input produces the same bytes and the files diff cleanly in git.

Output shape:
  {"fhirVersion": "4.0.1",
   "types": {"Patient": {"kind": "resource", "abstract": false,
                          "elements": [{"path": "Patient.contact.name", "min": 0, "max": "1",
                                        "summary": true, "types": ["HumanName"]}, ...]}, ...}}
An element defined by contentReference has no "types" but a "ref" such as
"#Questionnaire.item". The FHIRPath system types used on id-like elements
(http://hl7.org/fhirpath/System.String) are written as their last URL segment
("System.String").
"""

import gzip
import io
import json
import os
import sys

KINDS = {"resource", "complex-type"}


def type_code(code):
    # The snapshot writes FHIRPath system types as URLs; keep only the last segment.
    return code.rsplit("/", 1)[-1]


def element_row(el):
    row = {
        "path": el["path"],
        "min": el.get("min", 0),
        "max": el.get("max", "*"),
        "summary": bool(el.get("isSummary", False)),
    }
    types = [type_code(t["code"]) for t in el.get("type", []) if "code" in t]
    if types:
        row["types"] = types
    if "contentReference" in el:
        row["ref"] = el["contentReference"]
    return row


def collect(bundle, table):
    for entry in bundle.get("entry", []):
        sd = entry.get("resource", {})
        if sd.get("resourceType") != "StructureDefinition":
            continue
        if sd.get("kind") not in KINDS or sd.get("derivation") != "specialization":
            continue
        name = sd["type"]
        table[name] = {
            "kind": sd["kind"],
            "abstract": bool(sd.get("abstract", False)),
            "elements": [element_row(el) for el in sd["snapshot"]["element"]],
        }


def write_gz(path, data):
    buf = io.BytesIO()
    # filename="" and mtime=0 keep the header free of anything that changes between runs.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def main(argv):
    if len(argv) != 3:
        sys.stderr.write(__doc__)
        return 2
    src, out = argv[1], argv[2]
    table = {}
    for name in ("profiles-resources.json", "profiles-types.json"):
        with open(os.path.join(src, name), encoding="utf-8") as f:
            collect(json.load(f), table)
    doc = {"fhirVersion": "4.0.1", "types": dict(sorted(table.items()))}
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, sort_keys=False)
    write_gz(out, text.encode("utf-8"))
    with open(os.path.join(src, "fhir.schema.json"), "rb") as f:
        schema = f.read()
    write_gz(os.path.join(os.path.dirname(os.path.abspath(out)), "fhir.schema.json.gz"), schema)
    # The five CompartmentDefinitions (Patient, Encounter, RelatedPerson, Practitioner,
    # Device), unmodified, for compartment search and Patient/$everything.
    with open(os.path.join(src, "profiles-resources.json"), encoding="utf-8") as f:
        compartments = [e["resource"] for e in json.load(f)["entry"]
                        if e["resource"]["resourceType"] == "CompartmentDefinition"]
    write_gz(os.path.join(os.path.dirname(os.path.abspath(out)), "compartments.json.gz"),
             json.dumps(compartments, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    resources = sum(1 for t in table.values() if t["kind"] == "resource" and not t["abstract"])
    print(f"{out}: {len(table)} types ({resources} concrete resources), "
          f"{sum(len(t['elements']) for t in table.values())} elements")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
