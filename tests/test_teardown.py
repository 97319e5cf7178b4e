"""Entry points freeze their objects at exit (tune_lfm/teardown.py), so the interpreter's last collections skip the
training stack they imported (1.5-2 CPU-seconds per process otherwise; benchmarks/RESULTS.md)."""

import subprocess
import sys

import pytest

SCRIPT = """
import atexit, gc, sys
atexit.register(lambda: print(gc.get_freeze_count(), flush=True))  # runs after handlers registered later
alive = [[[] for _ in range(10)] for _ in range(50_000)]  # 550,000 objects the collector tracks
if sys.argv[1] == "skipped":
    from tune_lfm.teardown import skip_collection_at_exit
    skip_collection_at_exit()
    skip_collection_at_exit()
    atexit.register(lambda: print("later handler ran", flush=True))
"""


def frozen_at_exit(mode: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split("\n")[:-1]


def test_at_exit_the_live_objects_are_frozen_after_the_other_exit_handlers():
    assert frozen_at_exit("default") == ["0"]
    later, frozen = frozen_at_exit("skipped")
    assert later == "later handler ran" and int(frozen) > 550_000


@pytest.mark.parametrize("module", ["search", "trial", "export", "targets", "atlas.__main__", "analysis.__main__"])
def test_every_cli_skips_the_collection_at_exit(module):
    import importlib

    from tune_lfm.teardown import skip_collection_at_exit

    main = importlib.import_module(f"tune_lfm.{module}").main
    skip_collection_at_exit.cache_clear()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert skip_collection_at_exit.cache_info().currsize == 1
