"""The real ``modelbus agent`` on the NVML backend, as on a GPU host: a fake pynvml (one
24 GB GPU, pynvml's real exceptions) stands in for the driver this machine lacks. At exit
it writes the name of every module the process loaded to ``$MODELBUS_TEST_MODULES``.
Run as ``python -m tests.support.nvml_agent agent --config ...``."""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

from tests.fakes.fake_nvml import MIB, FakeDevice, make_fake_nvml

sys.modules["pynvml"] = make_fake_nvml(
    [FakeDevice(uuid="GPU-test", name="NVIDIA L4", memory_total_bytes=24576 * MIB)]
)


@atexit.register
def _write_loaded_modules() -> None:
    Path(os.environ["MODELBUS_TEST_MODULES"]).write_text(json.dumps(sorted(sys.modules)))


if __name__ == "__main__":
    from modelbus import cli

    sys.exit(cli.main(sys.argv[1:]))
