"""The endpoint's settings, typed and with their defaults in one place.

``serve run serving.app:build_app package=...``, ``serve deploy serving/config.yaml`` (its ``args``) and
``pneumonia serve`` all build a :class:`ServeSettings`; a wrong key or type is refused, with the key named,
when the application is built, before any replica starts. So is an endpoint that would listen beyond loopback
without a token, unless ``allow_unauthenticated`` says so (:meth:`ServeSettings.check_exposure`).
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runtime.errors import PneumoniaError

TOKEN_ENV = "PNEUMONIA_API_TOKEN"
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2}  # target_ongoing_requests: max_batch_size (a full batch)
# Overload (BENCHMARKS.md, "Serving under overload"). What a client cares about is how long it waits, so the bound is
# a waiting-time budget, kept by HAProxy: a request that would wait longer than QUEUE_TIMEOUT_MS for a replica is
# answered 503 with Retry-After, at once when the queue ahead of it is already longer than the replicas drain in half
# the budget, and after the budget at the latest. A replica takes two batches at once (one in the model, one gathering),
# so its batches stay full under load; a count of 2-3 requests starved them (1.9-2.0 films per model call, half
# the throughput). The queue's length is bounded too, per replica, only as a memory guard.
QUEUE_TIMEOUT_MS = 500
MAX_BATCH_SIZE = 32
QUEUE_GUARD_BATCHES = 16  # HAProxy's memory guard: at most this many batches waiting per replica
RETRY_AFTER_S = 1.0


class ServeSettingsError(PneumoniaError, ValueError):
    """Serving settings (``config.yaml``'s args, ``serve run`` arguments) that do not fit :class:`ServeSettings`."""


class ServeSettings(BaseModel):
    """One deployment of one model package."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    package: str = Field(min_length=1, description="the model package directory (artifacts/VERSION)")
    replicas: int = Field(0, ge=0, description="a fixed replica count; 0 = autoscaling")
    autoscaling: dict[str, Any] = Field(default_factory=dict, description="overrides of AUTOSCALING")
    num_cpus: float = Field(1.0, gt=0, description="per replica; its TensorFlow threads follow")
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_pixels: int = Field(40_000_000, gt=0, description="above this a small file is a decompression bomb")
    auth_token: str = Field("", repr=False, description=f"bearer token for /predict; empty = ${TOKEN_ENV}, or no auth")
    allow_unauthenticated: bool = Field(False, description="listen beyond loopback without a token (warned, also "
                                                           "in /metadata); refused otherwise")
    queue_timeout_ms: int = Field(QUEUE_TIMEOUT_MS, ge=0, description="the longest a request waits for a replica "
                                  "(HAProxy ingress); one that would wait longer is answered 503. The client's "
                                  "patience minus one model call; 0 = no time bound")
    max_batch_size: int = Field(MAX_BATCH_SIZE, gt=0, description="films per model call at most (@serve.batch)")
    max_ongoing_requests: int | None = Field(None, gt=0, description="requests a replica works on at once (reading, "
                                             "decoding, in the model's batch); default 2 x max_batch_size")
    max_queued_requests: int | None = Field(None, ge=-1, description="requests waiting per replica at most: with "
                                            "HAProxy a memory guard behind the budget (default 16 batches), with "
                                            "the Python ingress the only bound (default one batch); -1 = no bound")
    retry_after_s: float = Field(RETRY_AFTER_S, ge=0, description="the Retry-After header of that 503, in seconds "
                                                                  "(rounded up)")

    @field_validator("max_queued_requests")
    @classmethod
    def _positive_or_unbounded(cls, value: int | None) -> int | None:
        if value == 0:  # Serve's own rule: 0 would refuse every request that finds the replica busy
            raise ValueError("must be -1 (no bound) or at least 1")
        return value

    @property
    def ongoing(self) -> int:
        """Requests a replica takes at once: ``max_ongoing_requests``, by default two batches (one in the model,
        the next gathering), so that batches stay full under load."""
        return self.max_ongoing_requests or 2 * self.max_batch_size

    @property
    def batch(self) -> int:
        """Films per model call: ``max_batch_size``, never more than the requests a replica takes at once."""
        return min(self.max_batch_size, self.ongoing)

    def queued(self, ingress: str = "haproxy") -> int:
        """Requests waiting at most: ``max_queued_requests``, by default per replica a memory guard of
        QUEUE_GUARD_BATCHES batches behind HAProxy's budget, or one batch for Serve's own count (each Python proxy's,
        or a replica's behind Ray's own HAProxy), where Serve bounds no waiting time; -1 = none."""
        if self.max_queued_requests is not None:
            return self.max_queued_requests
        return QUEUE_GUARD_BATCHES * self.batch if ingress == "haproxy" else self.batch

    @classmethod
    def parse(cls, args: dict[str, Any] | ServeSettings) -> ServeSettings:
        """Settings from a mapping (YAML args, ``serve run`` key=value pairs), with errors naming the key."""
        if isinstance(args, cls):
            return args
        try:
            return cls.model_validate(dict(args))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}" for e in exc.errors())
            known = ", ".join(cls.model_fields)
            raise ServeSettingsError(f"serving settings: {problems} (known keys: {known})") from None

    def token(self) -> str:
        return self.auth_token or os.environ.get(TOKEN_ENV, "")

    def check_exposure(self, host: str | None) -> str | None:
        """For an endpoint listening on ``host``: a :class:`ServeSettingsError` when that is beyond loopback
        with no token and no ``allow_unauthenticated``; the warning to show when it is allowed; else None."""
        if is_loopback(host) or self.token():
            return None
        if not self.allow_unauthenticated:
            raise ServeSettingsError(
                f"the endpoint would listen on {host}, beyond this machine, with no token: anyone who reaches it "
                f"could use /predict. Set one (export {TOKEN_ENV}=$(openssl rand -hex 32), or args.auth_token in a "
                f"Serve config; clients send Authorization: Bearer TOKEN), or listen on 127.0.0.1, or say so: "
                f"--allow-unauthenticated (args.allow_unauthenticated: true)")
        return (f"warning: the endpoint listens on {host} with no token (--allow-unauthenticated): anyone who "
                f"reaches it can use /predict; set ${TOKEN_ENV} to require one")

    def security(self) -> dict[str, Any]:
        """What ``/metadata`` says about access: whether /predict needs a token, and a warning when it was
        allowed to go without one."""
        if self.token():
            return {"authentication": True}
        if self.allow_unauthenticated:
            return {"authentication": False,
                    "warning": "no bearer token and allow_unauthenticated: anyone who reaches this endpoint can use "
                               "/predict"}
        return {"authentication": False}

    def haproxy_queue(self, app: str) -> str | None:
        """The bound the HAProxy of a local server keeps for application ``app`` with these settings."""
        return haproxy_queue(app, self.ongoing, self.queued("haproxy"), self.retry_after_s, self.queue_timeout_ms,
                             self.batch)

    def deployment_options(self) -> dict[str, Any]:
        """Serve options of the classifier deployment: replicas or autoscaling, CPUs, the package to load, what
        a replica takes at once, and Serve's own count bound (the Python ingress's; behind HAProxy a replica
        never holds more than ``max_ongoing_requests``, so it never applies)."""
        options: dict[str, Any] = {"user_config": {"package": self.package},
                                   "ray_actor_options": {"num_cpus": self.num_cpus},
                                   "max_ongoing_requests": self.ongoing,
                                   "max_queued_requests": self.queued("python"),
                                   "backpressure_config": {"status_code": 503, "retry_after_s": self.retry_after_s}}
        if self.replicas:
            options.update(num_replicas=self.replicas, autoscaling_config=None)
        else:
            options["autoscaling_config"] = self.autoscaling_config()
        return options

    def autoscaling_config(self) -> dict[str, Any]:
        """AUTOSCALING with ``autoscaling`` over it. The target is a full batch: a replica holding more is
        gathering its next batch while one runs, so a second replica starts when batches are full, not when one
        request waits."""
        return {**AUTOSCALING, "target_ongoing_requests": self.batch, **self.autoscaling}

    @model_validator(mode="after")
    def _target_below_the_limit(self) -> ServeSettings:
        """A replica never holds more than ``max_ongoing_requests``: a target at or above it never scales up."""
        target = self.autoscaling_config()["target_ongoing_requests"]
        if not self.replicas and target >= self.ongoing:
            raise ValueError(f"autoscaling.target_ongoing_requests ({target}) must be below max_ongoing_requests "
                             f"({self.ongoing}), or a replica never counts enough requests to scale up (the default "
                             f"target is max_batch_size, the default max_ongoing_requests twice that)")
        return self


def haproxy_queue(app: str, max_ongoing: int, max_queued: int, retry_after_s: float = RETRY_AFTER_S,
                  queue_timeout_ms: int = QUEUE_TIMEOUT_MS, batch: int = 1) -> str | None:
    """``$PNEUMONIA_HAPROXY_QUEUE`` for a local server of application ``app`` (``serving.haproxy_wrapper``):
    HAProxy sends a replica at most ``max_ongoing`` requests at once, lets a request wait ``queue_timeout_ms``
    at most (0: no time bound), ``max_queued`` per replica at most (-1: no guard), and answers the rest 503
    itself; ``batch``: what a replica drains per model call, the least it is assumed to drain in the budget.
    None when nothing is bounded."""
    if max_queued == -1 and not queue_timeout_ms:
        return None
    return f"{app}={max_ongoing},{max_queued},{retry_after_s:g},{queue_timeout_ms},{batch}"


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` reaches only this machine: 127.0.0.0/8 (also as ::ffff:127.x), ::1, ``localhost``; None
    is Serve's HTTP off. 0.0.0.0, ::, an interface's address or another name may be reached from elsewhere."""
    if host is None or host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)
