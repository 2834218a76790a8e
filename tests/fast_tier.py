"""The fast tier's guard: a test not marked ``services`` (or ``slow``) that starts Ray, Serve or a server fails,
saying which mark it needs, so ``pytest -m "not slow and not services"`` stays minutes long and needs nothing
running. In-process, ``ray.init`` refuses; a child process is refused by what its command line runs (a ``ray``
executable, a search, a serving or run command, or ``-c`` code that starts Ray)."""

from __future__ import annotations

import subprocess

MARKS = ("services", "slow")
SERVING_COMMANDS = {"run", "serve", "tune", "dashboard"}
RAY_CODE = ("ray.init(", "start_ray(", "serve.run(", "serve_model(")
SERVERS = {"moto_server", "sshd", "chromium", "haproxy", "uvicorn", "optuna-dashboard", "tensorboard"}


class StartsServices(AssertionError):
    pass


def _refuse(what: str):
    raise StartsServices(f"this test starts {what}: mark it @pytest.mark.services (the fast tier, "
                         "-m 'not slow and not services', runs no Ray, Serve or server)")


def starts_services(argv) -> str | None:
    """What a child process's command line would start, or None."""
    args = [str(a) for a in (argv if isinstance(argv, (list, tuple)) else [argv])]
    if not args:
        return None
    program = args[0].rsplit("/", 1)[-1]
    if program == "ray":
        return "a Ray node or job (the ray command)"
    if program in SERVERS or any("playwright" in arg for arg in args[:2]):
        return f"a server or browser ({program})"
    if "tuning.search" in args:
        return "a search (python -m tuning.search)"
    for i, arg in enumerate(args):
        if (arg.endswith("/pneumonia") or arg == "cli.main") and SERVING_COMMANDS & set(args[i + 1:i + 2]):
            return f"pneumonia {args[i + 1]}"
        if arg == "-c" and i + 1 < len(args) and any(code in args[i + 1] for code in RAY_CODE):
            return "Ray (in python -c code)"
    return None


def install(monkeypatch) -> None:
    """Refuse Ray in-process and service-starting child processes for the rest of one test."""
    import ray

    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: _refuse("Ray (ray.init)"))
    original = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        what = starts_services(args)
        if what:
            _refuse(what)
        original(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
