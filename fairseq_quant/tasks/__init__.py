from . import speech_recognition_augment  # noqa: F401  (registration side effect)
