"""A script's config block as command-line flags: every key a ``--key value`` flag of its type."""
import argparse

from utils.errors import UserError


def parse_bool(text):
    """``--key true|false|1|0|yes|no`` for the boolean keys of a config block."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")
    return value


def parse_config(defaults, presets, argv, description):
    """``defaults`` overridden by the preset ``--preset`` names (one of ``presets``), then by the
    flags given in ``argv``."""
    parser = argparse.ArgumentParser(description=description)
    for key, value in defaults.items():
        parser.add_argument(f"--{key}", type=parse_bool if isinstance(value, bool) else type(value),
                            default=None)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    config = dict(defaults)
    preset_name = given.get("preset", config.get("preset"))
    if preset_name:
        if preset_name not in presets:
            raise UserError(f"unknown preset '{preset_name}': choose from {', '.join(presets)}")
        config.update(presets[preset_name])
    config.update(given)
    return config
