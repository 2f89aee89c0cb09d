"""Exceptions for bad input that the command line reports as one line."""


class MlprobeError(Exception):
    """Invalid input or state that the user can fix. The message names the fix."""


class DatasetError(MlprobeError):
    """A dataset root, annotation file, split or image is missing or invalid."""


class BackboneError(MlprobeError):
    """A backbone name, checkpoint or pretrained weight file is invalid or missing."""


class StoreError(MlprobeError):
    """A feature store is missing, incomplete, damaged or incompatible."""


class DownloadError(MlprobeError):
    """An archive could not be downloaded or did not match its expected size."""
