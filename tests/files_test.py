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


class FileSafetyTest(absltest.TestCase):
    def test_permissions_match_keras_save(self):
        folder = self.create_tempdir().full_path
        ours, theirs = (os.path.join(folder, n) for n in ("a.keras", "b.keras"))
        files.save_model(tiny.mlp(), ours)
        tiny.mlp().save(theirs)
        self.assertEqual(
            os.stat(ours).st_mode & 0o777, os.stat(theirs).st_mode & 0o777
        )

    def test_missing_or_read_only_folder_fails_before_training(self):
        folder = self.create_tempdir().full_path
        with self.assertRaisesRegex(FileNotFoundError, "does not exist"):
            files.check_writable(os.path.join(folder, "no", "m.keras"))
        # Root may write anywhere, so the folder's answer is mocked.
        with mock.patch.object(os, "access", return_value=False):
            with self.assertRaisesRegex(PermissionError, "not writable"):
                files.check_writable(os.path.join(folder, "m.keras"))

    def test_temporary_of_a_killed_save_is_removed(self):
        folder = self.create_tempdir().full_path
        # pid 2**22 + 1 is above Linux's pid_max, so no process has it.
        stale = os.path.join(folder, f".saving-m.keras-{2**22 + 1}-x.keras")
        with open(stale, "wb") as file:
            file.write(b"a killed writer's half archive")
        files.save_model(tiny.mlp(), os.path.join(folder, "m.keras"))
        self.assertEqual(os.listdir(folder), ["m.keras"])


class LegacyFormatTest(absltest.TestCase):
    def test_distiller_refuses_hdf5(self):
        import keras_selfdistill as ksd

        distiller = ksd.Distiller(
            tiny.mlp(), [ksd.terms.Distillation(tiny.mlp(seed=2))]
        )
        folder = self.create_tempdir().full_path
        with self.assertRaisesRegex(ValueError, "legacy HDF5"):
            distiller.save(os.path.join(folder, "d.h5"))
        self.assertEqual(os.listdir(folder), [])
        distiller.save_weights(os.path.join(folder, "d.weights.h5"))
