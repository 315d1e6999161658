"""Prints what a development environment needs, one requirement a line, from pyproject.toml: the
build requirements, the core dependencies and the extras named on the command line (their
`maml_ext[...]` references expanded), without torch (the Makefile's TORCH picks that one).

    python build_tools/requirements.py test lint > requirements.txt

pyproject.toml stays the one list; the Makefile installs from this output before building.
"""

import os
import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's own copy of the same parser
    from pip._vendor import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _name(requirement):
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


def requirements(extras):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        config = tomllib.load(f)
    project = config["project"]
    optional = project.get("optional-dependencies", {})
    found = list(config["build-system"]["requires"]) + list(project["dependencies"])
    pending = list(extras)
    seen = set()
    while pending:
        extra = pending.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"no extra {extra!r} in pyproject.toml (it has {sorted(optional)})")
        seen.add(extra)
        for requirement in optional[extra]:
            own = re.fullmatch(re.escape(project["name"]) + r"\[(.+)\]", requirement.strip())
            if own:
                pending.extend(e.strip() for e in own.group(1).split(","))
            else:
                found.append(requirement)
    unique = []
    for requirement in found:
        if _name(requirement) != "torch" and requirement not in unique:
            unique.append(requirement)
    return unique


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1:])))
