"""Lets `python -m mapper` run the same command as `mapper`."""

from __future__ import annotations

from mapper.cli import main

main()
