"""Errors users fix by changing their input; entry scripts print them as one line."""


class SegtuneError(Exception):
    """Base for errors caused by user input (config, data, paths), shown as one line."""


class ConfigError(SegtuneError):
    """A config file, key or value is invalid."""


class DataError(SegtuneError):
    """A dataset file, image or annotation is invalid."""


class WeightsNotFoundError(SegtuneError):
    """Pretrained encoder weights were asked for but are not available offline."""


class NonFiniteLossError(SegtuneError):
    """The training loss became NaN or infinite."""
