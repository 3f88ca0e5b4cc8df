"""Removes machine-specific noise from the example notebooks' outputs.

TensorFlow's C++ start-up lines (absl, oneDNN, CUDA stub, CPU feature
notes) reach a kernel's stderr before `TF_CPP_MIN_LOG_LEVEL` can silence
them, and warnings name the site-packages of the machine that ran the
notebook. After executing the notebooks (docs/development.md):

    python tools/tidy_notebooks.py examples/*.ipynb

drops those lines (and outputs left empty) and shortens the paths to
`.../site-packages/...`. `tests/notebooks_test.py` fails on notebooks that
still hold either.
"""

import json
import re
import sys

NOISE = re.compile(
    r"^(WARNING: All log messages before absl|[IWE]\d{4} \d\d:\d\d:|"
    r"To enable the following instructions|"
    r".*(cuda_?drivers|cudart_stub|cpu_feature_guard|oneDNN custom operations))"
)
SITE_PACKAGES = re.compile(r"(?:/[^\s\"':]+)+/site-packages/")


def tidy(notebook):
    """The notebook's outputs without the noise; returns the count of
    lines removed or shortened."""
    changed = 0
    for cell in notebook["cells"]:
        kept = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                lines = "".join(output["text"]).splitlines(keepends=True)
                clean = [line for line in lines if not NOISE.match(line)]
                changed += len(lines) - len(clean)
                text = "".join(clean)
                shorter = SITE_PACKAGES.sub(".../site-packages/", text)
                changed += shorter != text
                if not shorter.strip():
                    continue
                output["text"] = shorter.splitlines(keepends=True)
            kept.append(output)
        if "outputs" in cell:
            cell["outputs"] = kept
    return changed


def main(paths):
    for path in paths:
        with open(path) as file:
            notebook = json.load(file)
        changed = tidy(notebook)
        if changed:
            with open(path, "w") as file:
                json.dump(notebook, file, indent=1, ensure_ascii=False)
                file.write("\n")
        print(f"{path}: {changed} lines tidied")


if __name__ == "__main__":
    main(sys.argv[1:])
