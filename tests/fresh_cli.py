"""Run ``python finetuning.py ARGS`` many times cheaply, each time in a fresh process (holds no tests).

A server process imports torch, transformers and datasets once and then, for every request, forks a child
that runs the real entry point file (``runpy`` as ``__main__``, exactly as ``python finetuning.py`` does,
uncaught exceptions printed by the interpreter's own hook) with its stdout and stderr in files. The server
itself never runs shardtune, so every child starts from the state of a freshly started interpreter plus the
imports, and one case cannot leak state into the next. A failing case costs the work up to its error
(tens of milliseconds) instead of the ~3 s of starting Python and importing torch.

Protocol, one JSON object per line: request {"argv", "cwd", "stdout", "stderr", "env"} -> reply {"rc"}.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "finetuning.py"


def _child(request: dict) -> None:
    os.chdir(request["cwd"])
    os.environ.update(request.get("env") or {})
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = [str(ENTRY), *request["argv"]]
    import runpy

    code = 0
    try:
        runpy.run_path(str(ENTRY), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # what the interpreter does with an uncaught exception: print it, exit 1
        sys.excepthook(*sys.exc_info())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    import datasets  # noqa: F401  - the expensive imports, done once
    import fire  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


class FreshCli:
    """Client: ``FreshCli().run(argv, cwd, out_dir) -> (rc, stdout, stderr)``; close() when done."""

    def __init__(self, env: dict):
        self.env = env
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=REPO)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, argv, cwd: Path, log_dir: Path):
        out, err = log_dir / "stdout.txt", log_dir / "stderr.txt"
        request = {"argv": [str(a) for a in argv], "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self.proc.stdout.readline())["rc"]
        return rc, out.read_text(errors="replace"), err.read_text(errors="replace")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    serve()
