"""Rewrite the root pyproject's `constraint-dependencies` from a fresh `uv lock`.

uv.lock names the package index's hosts, so it is never committed; the exact
versions it resolved live in pyproject.toml instead. Run after changing any
dependency range:  python3 -m uv lock --upgrade && python3 scripts/refresh_pins.py
"""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _marker(markers: list[str]) -> str:
    # The lock writes one marker per Python range; drop the platform part that
    # `environments` already fixes and join the ranges.
    parts = [m.replace(" and sys_platform == 'linux'", "").replace("sys_platform == 'linux'", "") for m in markers]
    parts = [p for p in parts if p]
    return " or ".join(f"({p})" if " and " in p else p for p in parts)


def main() -> None:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    by_name: dict[str, list[dict]] = {}
    for pkg in lock["package"]:
        if pkg["name"].startswith("glq-") or "virtual" in pkg.get("source", {}):
            continue
        by_name.setdefault(pkg["name"], []).append(pkg)
    lines = []
    for name in sorted(by_name):
        versions = by_name[name]
        if len(versions) == 1:
            lines.append(f'    "{name}=={versions[0]["version"]}",')
        else:
            for pkg in versions:
                lines.append(f'    "{name}=={pkg["version"]}; {_marker(pkg["resolution-markers"])}",')
    path = ROOT / "pyproject.toml"
    text = path.read_text()
    new, n = re.subn(r"constraint-dependencies = \[\n.*?\]", "constraint-dependencies = [\n" + "\n".join(lines) + "\n]",
                     text, flags=re.S)
    if n != 1:
        raise SystemExit("pyproject.toml has no constraint-dependencies list to rewrite")
    path.write_text(new)
    print(f"pinned {len(lines)} requirements")


if __name__ == "__main__":
    main()
