"""A script's config block as command-line flags: every key a ``--key value`` flag of its type,
described in ``--help`` by the key's comment in the block."""
import argparse
import re

from utils.errors import UserError


def parse_bool(text):
    """``--key true|false|1|0|yes|no`` for the boolean keys of a config block."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")
    return value


def block_comments(script):
    """``{key: comment}`` for the config block of ``script`` (the lines between its first two
    ``# ---`` rules): a key's comment follows its assignment, and may go on in comment-only lines
    below it."""
    comments, key, inside = {}, None, False
    with open(script) as stream:
        for line in stream:
            if line.startswith("# ---"):
                if inside:
                    break
                inside = True
                continue
            assignment = re.match(r"(\w+)\s*=[^#]*(?:#\s*(.*))?$", line) if inside else None
            if assignment:
                key = assignment.group(1)
                comments[key] = (assignment.group(2) or "").strip()
            elif inside and key and line.startswith(" ") and line.strip().startswith("#"):
                comments[key] += " " + line.strip().lstrip("#").strip()
    return comments


def help_text(comment, default):
    shown = '""' if default == "" else default
    return f"{comment} (default: {shown})" if comment else f"default: {shown}"


def parse_config(defaults, presets, argv, description, script):
    """``defaults`` overridden by the preset ``--preset`` names (one of ``presets``), then by the
    flags given in ``argv``; ``--help`` describes each key by its comment in ``script``'s block."""
    preset_lines = "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                             for name, values in presets.items())
    parser = argparse.ArgumentParser(description=description, epilog=f"presets: {preset_lines}" if presets else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = block_comments(script)
    for key, value in defaults.items():
        parser.add_argument(f"--{key}", type=parse_bool if isinstance(value, bool) else type(value),
                            default=None, metavar=type(value).__name__.upper(),
                            help=help_text(comments.get(key, ""), value))
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    config = dict(defaults)
    preset_name = given.get("preset", config.get("preset"))
    if preset_name:
        if preset_name not in presets:
            raise UserError(f"unknown preset '{preset_name}': choose from {', '.join(presets)}")
        config.update(presets[preset_name])
    config.update(given)
    return config
