"""The committed example notebooks hold no machine-specific output."""

import glob
import json
import os
import re

from absl.testing import absltest

from tests import tiny
from tools import tidy_notebooks

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ABSOLUTE = re.compile(r"(?<![\w.])/(?:work|tmp|home|root|usr|opt|Users)/")


def _outputs(path):
    with open(path) as file:
        notebook = json.load(file)
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            yield json.dumps(output)


# Files only: once.
@tiny.ONCE
class NotebookOutputsTest(absltest.TestCase):
    def test_no_log_noise_and_no_absolute_paths(self):
        paths = glob.glob(os.path.join(_ROOT, "examples", "*.ipynb"))
        self.assertNotEmpty(paths)
        for path in paths:
            for text in _outputs(path):
                for line in json.loads(text).get("text", []):
                    self.assertIsNone(tidy_notebooks.NOISE.match(line), path)
                self.assertIsNone(_ABSOLUTE.search(text), (path, text[:300]))

    def test_tidy_drops_the_noise_and_shortens_paths(self):
        notebook = {
            "cells": [
                {
                    "outputs": [
                        {
                            "output_type": "stream",
                            "name": "stderr",
                            "text": [
                                "WARNING: All log messages before absl::"
                                "InitializeLog() is called are written\n",
                                "I0000 00:00:17.5 9731 port.cc:153] oneDNN "
                                "custom operations are on.\n",
                            ],
                        },
                        {
                            "output_type": "stream",
                            "name": "stderr",
                            "text": [
                                "/work/x/.venv/lib/python3.11/site-packages/"
                                "keras/a.py:74: UserWarning: w\n"
                            ],
                        },
                    ]
                }
            ]
        }
        self.assertEqual(tidy_notebooks.tidy(notebook), 3)
        (output,) = notebook["cells"][0]["outputs"]
        self.assertEqual(
            output["text"],
            [".../site-packages/keras/a.py:74: UserWarning: w\n"],
        )
