import os
from unittest import mock

import keras
from absl.testing import absltest

from keras_selfdistill import files
from tests import tiny


class SaveModelTest(absltest.TestCase):
    def test_saves_and_refuses_to_overwrite(self):
        folder = self.create_tempdir().full_path
        path = os.path.join(folder, "m.keras")
        files.save_model(tiny.mlp(), path)
        keras.saving.load_model(path, safe_mode=True)
        with open(path, "rb") as file:
            before = file.read()
        with self.assertRaisesRegex(FileExistsError, "overwrite=True"):
            files.save_model(tiny.mlp(seed=1), path)
        with open(path, "rb") as file:
            self.assertEqual(file.read(), before)
        files.save_model(tiny.mlp(seed=1), path, overwrite=True)
        self.assertEqual(os.listdir(folder), ["m.keras"])
        with self.assertRaisesRegex(ValueError, "end in `.keras`"):
            files.save_model(tiny.mlp(), os.path.join(folder, "m.h5"))

    def test_failed_save_leaves_the_old_file_and_no_temporary(self):
        folder = self.create_tempdir().full_path
        path = os.path.join(folder, "m.keras")
        files.save_model(tiny.mlp(), path)
        with open(path, "rb") as file:
            before = file.read()
        model = tiny.mlp(seed=1)

        def crash(filepath, *args, **kwargs):
            with open(filepath, "wb") as file:
                file.write(b"half an archive")
            raise KeyboardInterrupt

        with mock.patch.object(model, "save", crash):
            with self.assertRaises(KeyboardInterrupt):
                files.save_model(model, path, overwrite=True)
        with open(path, "rb") as file:
            self.assertEqual(file.read(), before)
        self.assertEqual(os.listdir(folder), ["m.keras"])
