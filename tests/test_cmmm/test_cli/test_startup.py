"""`cmmm --help` and `cmmm list` start without the heavy libraries; the listing is current."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cmmm.listing import live_listing, stored_listing

HEAVY = ("torch", "avalanche", "tensorboard", "ray", "torchvision", "transformers")

PROBE = """
import sys
from typer.testing import CliRunner
from cmmm.cli import app
result = CliRunner().invoke(app, {args!r})
assert result.exit_code == 0, result.output
print(sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize(
    "args", [["--help"], ["list", "strategies"], ["list", "streams"], ["run", "--help"]]
)
def test_light_commands_import_no_heavy_library(args) -> None:
    probe = PROBE.format(args=args, heavy=HEAVY)
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_stored_listing_matches_the_registries() -> None:
    """Fails when a strategy or stream changed without `python -m cmmm.listing`."""
    live = json.loads(json.dumps(live_listing()))
    stored = json.loads(json.dumps(stored_listing()))
    assert stored == live, "cmmm/listing.json is stale: rewrite it with `python -m cmmm.listing`"


def test_first_torchvision_import_gets_the_fix() -> None:
    """Importing Avalanche after cmmm works (torchvision is fixed at its first import)."""
    probe = "import cmmm, avalanche, torchvision; print(torchvision.__name__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip() == "torchvision"
