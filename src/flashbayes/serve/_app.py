"""The FastAPI application: streams of observations filtered by an amortized model."""

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import os
import sqlite3
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, Strict

from flashbayes.distributions import GMM
from flashbayes.distributions._gmm import validate_gmm_arrays
from flashbayes.serve._batching import (
    Batcher,
    Busy,
    Closed,
    Job,
    NumericalError,
    StreamGone,
)
from flashbayes.serve._store import CapacityError, StateLayout, StreamTable

API_VERSION = "v1"
_F32_MAX = float(np.finfo(np.float32).max)
_SEED_MAX = 2**32 - 1


# -- configuration --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Bounds and settings of the service.

    Attributes:
        max_batch: most streams updated in one compiled call; 1 switches micro-batching off.
        batch_window_ms: how long an update may wait for others to join its batch while the
            batch is not full (milliseconds; 0: take what is queued).
        max_streams: streams per server (creating one more answers 429).
        max_observations: observation rows per request (more answers 422).
        max_body_bytes: request body size (more answers 413).
        max_samples: draws per `GET ?samples=N`.
        max_prior_components: mixture components accepted in a prior; priors with more than
            the model's component count (but at most this many) are merged down to it.
        max_queued: requests waiting for the batcher at once (more answers 503).
        synchronous: SQLite's synchronous setting, "full" (a commit survives a power cut) or
            "normal" (a commit survives a killed server, not a power cut).
        token: bearer token every request must carry (None: no check).
        warmup: compile the batched step for every batch size at start-up.
    """

    max_batch: int = 64
    batch_window_ms: float = 2.0
    max_streams: int = 10_000
    max_observations: int = 1000
    max_body_bytes: int = 1 << 20
    max_samples: int = 10_000
    max_prior_components: int = 20
    max_queued: int = 10_000
    synchronous: str = "full"
    token: str | None = None
    warmup: bool = True

    def __post_init__(self):
        for name, lo, hi in (("max_batch", 1, 1024), ("max_streams", 1, 10_000_000),
                             ("max_observations", 1, 100_000),
                             ("max_body_bytes", 1024, 1 << 30), ("max_samples", 1, 1_000_000),
                             ("max_prior_components", 1, 64), ("max_queued", 1, 10_000_000)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name}: expected an integer in [{lo}, {hi}]; got {v!r}")
        w = self.batch_window_ms
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w <= 1000:
            raise ValueError(f"batch_window_ms: expected a number in [0, 1000]; got {w!r}")
        if self.synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous: expected 'full' or 'normal'; got "
                             f"{self.synchronous!r}")
        if self.token is not None and (not isinstance(self.token, str) or not self.token
                                       or any(c.isspace() for c in self.token)):
            raise ValueError("token: expected a non-empty string without spaces; got "
                             f"{self.token!r}")


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond localhost without a bearer token.

    Raises:
        ValueError: host is not a loopback address and token is empty.
    """
    if not is_loopback(host) and not token:
        raise ValueError(f"--host: expected a bearer token (--token or FLASHBAYES_TOKEN) to "
                         f"listen on {host!r}, which is not localhost; got none")


# -- request and response bodies ------------------------------------------------------------------

Number = Annotated[float, Strict()]


class PriorIn(BaseModel):
    """A Gaussian mixture: weights (K,), means (K, d) and scale_tril (K, d, d), or cov."""

    model_config = ConfigDict(extra="forbid")
    weights: list[Number]
    means: list[list[Number]]
    scale_tril: list[list[list[Number]]] | None = None
    cov: list[list[list[Number]]] | None = Field(
        None, description="covariances instead of scale_tril (Cholesky-factorised)")
    type: Literal["gmm"] | None = None


class CreateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prior: PriorIn


class ObservationsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    observations: list[list[Number | None]] = Field(
        description="rows of the model's data dimension, applied in order, one step each; "
                    "a row of nulls is a missing observation (the state only moves)")


class GMMOut(BaseModel):
    weights: list[float]
    means: list[list[float]]
    scale_tril: list[list[list[float]]]


class SummaryOut(BaseModel):
    mean: list[float]
    sd: list[float]


class StreamOut(BaseModel):
    id: str
    step: int = Field(description="observations applied so far")
    posterior: GMMOut
    summary: SummaryOut
    samples: list[list[float]] | None = None
    seed: int | None = None


class CreatedOut(StreamOut):
    prior_components: int = Field(description="components of the prior as sent")
    merged: bool = Field(description="whether the prior was merged down to the model's "
                                     "component count")


class HealthOut(BaseModel):
    status: str
    task: str
    streams: int
    max_streams: int
    max_batch: int
    queued: int
    batches: int
    steps: int


def _field_error(loc: list, msg: str, status: int = 422) -> HTTPException:
    return HTTPException(status, detail=[{"loc": loc, "msg": msg, "type": "value_error"}])


# -- conversions ----------------------------------------------------------------------------------


def _summary(state) -> dict:
    w, m, s, mask = state[:4]
    keep = np.asarray(mask, bool)
    w = np.asarray(w[keep], np.float64)
    w = w / w.sum()
    m = np.asarray(m[keep], np.float64)
    s = np.asarray(s[keep], np.float64)
    mean = w @ m
    diff = m - mean
    # per coordinate: sum_k w_k (||row_i of L_k||^2 + diff_ki^2)
    var = w @ ((s * s).sum(-1) + diff * diff)
    return {"mean": mean.tolist(), "sd": np.sqrt(np.maximum(var, 0.0)).tolist()}


def _posterior(state) -> dict:
    w, m, s, mask = state[:4]
    keep = np.asarray(mask, bool)
    if keep.all():
        return {"weights": w.tolist(), "means": m.tolist(), "scale_tril": s.tolist()}
    return {"weights": w[keep].tolist(), "means": m[keep].tolist(),
            "scale_tril": s[keep].tolist()}


def _stream_body(sid: str, step: int, state) -> dict:
    return {"id": sid, "step": step, "posterior": _posterior(state), "summary": _summary(state)}


def _json(body: dict, status: int = 200) -> Response:
    # serialised here: the bodies are built from finite arrays and need no re-validation
    return Response(json.dumps(body, allow_nan=False, separators=(",", ":")), status,
                    media_type="application/json")


# -- middleware -----------------------------------------------------------------------------------


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())] + (headers or [])})
    await send({"type": "http.response.body", "body": data})


class BearerAuth:
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <token>`."""

    def __init__(self, app, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await _send_json(send, 401, {"detail": "expected header 'Authorization: Bearer "
                                                       "<token>' with the server's token; got "
                                                       + ("a wrong token" if given else "none")},
                                 [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413 (by their
    Content-Length, or while reading a body sent without one)."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = {"detail": f"request body: expected at most {self.limit} bytes; got more"}
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                await _send_json(send, 400, {"detail": "Content-Length: expected an integer"})
                return
            if n > self.limit:
                await _send_json(send, 413, too_large, [(b"connection", b"close")])
                return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await _send_json(send, 413, too_large, [(b"connection", b"close")])
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# -- the application ------------------------------------------------------------------------------


def create_app(model: Any, *, db: str | os.PathLike, config: ServeConfig | None = None) -> FastAPI:
    """The service for one amortized model, its streams kept in the SQLite file `db`.

    Opening the database reloads the streams it holds. The batcher thread starts with the
    application (uvicorn's lifespan, or `with TestClient(app)`).

    Args:
        model: an `AmortizedPosterior` whose task takes observations (e.g. `lti_tracking`).
        db: SQLite file (created if missing; WAL mode).
        config: bounds and settings (`ServeConfig()` by default).

    Raises:
        TypeError: model is not an amortized model; config is not a `ServeConfig`.
        ValueError: the task takes no observations.
        StoreError: db holds streams of a model with another state shape.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> from fastapi.testclient import TestClient
        >>> from flashbayes.serve import ServeConfig, create_app
        >>> net = fb.DistributionTransformer(fb.DTConfig(theta_dim=4, data_dim=2, d_model=16,
        ...                                  n_layers=1, n_heads=2), key=jax.random.key(0))
        >>> model = fb.AmortizedPosterior(net, fb.tasks.get("lti_tracking"))
        >>> app = create_app(model, db=":memory:", config=ServeConfig(warmup=False))
        >>> prior = {"weights": [1.0], "means": [[0.0, 0.0, 1.0, 0.0]],
        ...          "scale_tril": [[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0],
        ...                          [0, 0, 0, 1.0]]]}
        >>> with TestClient(app) as client:
        ...     sid = client.post("/v1/streams", json={"prior": prior}).json()["id"]
        ...     out = client.post(f"/v1/streams/{sid}/observations",
        ...                       json={"observations": [[0.1, 0.0], [0.2, 0.0]]}).json()
        >>> out["step"], len(out["summary"]["mean"])
        (2, 4)
    """
    from flashbayes._filter import _filter_of
    from flashbayes.amortized import AmortizedPosterior

    if not isinstance(model, AmortizedPosterior):
        raise TypeError(f"model: expected an AmortizedPosterior; got {type(model).__name__}")
    config = ServeConfig() if config is None else config
    if not isinstance(config, ServeConfig):
        raise TypeError(f"config: expected a ServeConfig; got {type(config).__name__}")
    flt = _filter_of(model)
    task = model.task
    d, p, k = model.theta_dim, task.data_dim, flt.k
    unit = GMM(np.ones(1), np.zeros((1, d)), np.eye(d)[None])
    example = tuple(np.asarray(a) for a in flt.initial_state(unit))
    table = StreamTable(db, layout=StateLayout.of(task.name, example),
                        max_streams=config.max_streams, synchronous=config.synchronous)
    loops: list[asyncio.AbstractEventLoop] = []

    def deliver(jobs: list[Job]) -> None:
        # one wake-up of the event loop per batch, which then answers every finished request
        def settle_all():
            for job in jobs:
                job.settle(job.result)

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loops[0].call_soon_threadsafe(settle_all)

    batcher = Batcher(flt, table, max_batch=config.max_batch,
                      window=config.batch_window_ms / 1000.0, max_queued=config.max_queued,
                      deliver=deliver)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loops[:] = [asyncio.get_running_loop()]
        if config.warmup:
            batcher.warmup(example)
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()
            table.close()

    app = FastAPI(
        title="flashbayes posterior service",
        version=API_VERSION,
        lifespan=lifespan,
        description=(
            f"Streams of observations filtered by an amortized `{task.name}` model: each "
            "stream holds a posterior (a Gaussian mixture) that every observation updates in "
            "one forward pass. Updates are committed to SQLite before they are acknowledged."),
    )
    app.state.table = table
    app.state.batcher = batcher
    app.state.config = config

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        # loc, msg and type only: the offending input may hold NaN, which JSON cannot carry
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"},
                            status_code=500)

    # -- validation of bodies beyond their JSON types ---------------------------------------------
    def prior_from(body: PriorIn) -> GMM:
        loc = ["body", "prior"]
        kp = len(body.weights)
        if kp > config.max_prior_components:
            raise _field_error(loc + ["weights"], f"weights: expected at most "
                               f"{config.max_prior_components} components (more than {k} are "
                               f"merged down to {k}); got {kp}")
        if (body.scale_tril is None) == (body.cov is None):
            raise _field_error(loc, "prior: expected exactly one of scale_tril or cov; got "
                               + ("both" if body.cov is not None else "neither"))
        tril = body.scale_tril
        try:
            if tril is None:
                try:
                    cov = np.asarray(body.cov, np.float64)
                except ValueError:
                    raise ValueError("cov: expected (K, d, d) nested lists of numbers; got "
                                     "ragged lists") from None
                if cov.ndim != 3 or cov.shape[-1] != cov.shape[-2] or not np.isfinite(cov).all():
                    raise ValueError(f"cov: expected finite (K, d, d) matrices; got shape "
                                     f"{cov.shape}")
                if not np.allclose(cov, np.swapaxes(cov, -1, -2), rtol=1e-6, atol=0.0):
                    raise ValueError("cov: expected symmetric matrices; got asymmetric ones")
                try:
                    tril = np.linalg.cholesky(cov)
                except np.linalg.LinAlgError:
                    raise ValueError("cov: expected positive-definite matrices") from None
            w, m, s = validate_gmm_arrays(body.weights, body.means, tril)
        except (ValueError, TypeError) as exc:
            msg = str(exc)
            field = msg.split(":", 1)[0]
            where = loc + [field] if field in ("weights", "means", "scale_tril", "cov") else loc
            raise _field_error(where, msg) from None
        if m.shape[1] != d:
            raise _field_error(loc + ["means"], f"means: expected dimension {d} (task "
                               f"{task.name}); got {m.shape[1]}")
        return GMM(w, m, s, validate=False)

    def observations_from(body: ObservationsIn) -> tuple[np.ndarray, np.ndarray]:
        rows = body.observations
        loc = ["body", "observations"]
        if not rows:
            raise _field_error(loc, "observations: expected at least one row; got none")
        if len(rows) > config.max_observations:
            raise _field_error(loc, f"observations: expected at most {config.max_observations} "
                               f"rows per request; got {len(rows)}")
        ys = np.zeros((len(rows), p), np.float32)
        observed = np.ones(len(rows), bool)
        for i, row in enumerate(rows):
            if len(row) != p:
                raise _field_error(loc + [i], f"observations[{i}]: expected {p} numbers; got "
                                   f"{len(row)}")
            missing = [v is None or v != v for v in row]  # null, or NaN (v != v)
            if all(missing):
                observed[i] = False
                continue
            if any(missing):
                raise _field_error(loc + [i], f"observations[{i}]: expected numbers, or all "
                                   "null for a missing observation; got a partly missing row")
            if not all(abs(v) <= _F32_MAX for v in row):
                raise _field_error(loc + [i], f"observations[{i}]: expected finite numbers "
                                   "within float32 range; got inf or an overflowing value")
            ys[i] = row
        return ys, observed

    def stream_or_404(stream_id: str):
        current = table.get(stream_id)
        if current is None:
            raise HTTPException(404, detail=f"stream {stream_id!r}: no such stream")
        return current

    # -- endpoints --------------------------------------------------------------------------------
    @app.get("/v1/health", response_model=HealthOut, tags=["service"])
    async def health():
        """Liveness, the model's task, stream count and batching counters."""
        return {"status": "ok", "task": task.name, "streams": len(table),
                "max_streams": config.max_streams, "max_batch": config.max_batch,
                "queued": batcher.queued, "batches": batcher.batches, "steps": batcher.steps}

    @app.post("/v1/streams", status_code=201, response_model=CreatedOut, tags=["streams"])
    def create_stream(body: CreateIn):
        """Create a stream from a prior over the initial state (committed before the answer).

        A prior with more components than the model's count is merged down to it (moment-
        preserving merges of the closest pairs); `merged` says so.
        """
        prior = prior_from(body.prior)
        state = tuple(np.asarray(a) for a in flt.initial_state(prior))
        try:
            sid = table.create(state)
        except CapacityError as exc:
            raise HTTPException(429, detail=str(exc)) from None
        return _json({**_stream_body(sid, 0, state), "prior_components": prior.n_components,
                      "merged": prior.n_components > k}, 201)

    @app.post("/v1/streams/{stream_id}/observations", response_model=StreamOut,
              tags=["streams"], responses={404: {"description": "no such stream"},
                                           422: {"description": "malformed observations, or "
                                                 "a non-finite posterior (stream unchanged)"}})
    async def observe(stream_id: str, body: ObservationsIn):
        """Apply observations in order, one step each (transition, then update); the new
        state is committed before the answer. A request is applied as a whole or not at all."""
        stream_or_404(stream_id)
        ys, observed = observations_from(body)
        fut = asyncio.get_running_loop().create_future()

        def settle(result):  # runs on the event loop (see deliver)
            if not fut.done():
                fut.set_result(result)

        try:
            batcher.submit(Job(stream_id, ys, observed, settle))
        except (Busy, Closed) as exc:
            raise HTTPException(503, detail=str(exc)) from None
        result = await fut
        if isinstance(result, StreamGone):
            raise HTTPException(404, detail=str(result))
        if isinstance(result, NumericalError):
            raise _field_error(["body", "observations"], str(result))
        if isinstance(result, sqlite3.Error):
            raise HTTPException(503, detail=f"storage failure ({result}); the update was not "
                                            "applied")
        if isinstance(result, Exception):
            raise HTTPException(500, detail=f"update failed ({type(result).__name__}: "
                                            f"{result}); the stream is unchanged")
        step, state = result
        return _json(_stream_body(stream_id, step, state))

    @app.get("/v1/streams/{stream_id}", response_model=StreamOut, tags=["streams"],
             responses={404: {"description": "no such stream"}})
    def get_stream(stream_id: str,
                   samples: Annotated[int | None, Query(
                       ge=1, le=config.max_samples,
                       description="number of posterior draws to return")] = None,
                   seed: Annotated[int | None, Query(
                       ge=0, le=_SEED_MAX, description="PRNG seed of the draws (required with "
                                                       "samples)")] = None):
        """The current posterior (last committed step): mixture, mean and sd, draws on
        request (the same seed gives the same draws)."""
        step, state = stream_or_404(stream_id)
        out = _stream_body(stream_id, step, state)
        if samples is not None:
            if seed is None:
                raise _field_error(["query", "seed"], "seed: expected an integer seed with "
                                   "samples (draws are reproducible); got none")
            import jax

            w, m, s, _ = state[:4]
            # padded components have weight 0 and are never drawn; sizes padded to a power
            # of two so that few shapes are compiled
            n = 1 << max(4, (samples - 1).bit_length())
            draws = GMM.unchecked(w, m, s).sample(jax.random.key(seed), n)
            out["samples"] = np.asarray(draws, np.float64)[:samples].tolist()
            out["seed"] = seed
        return _json(out)

    @app.delete("/v1/streams/{stream_id}", status_code=204, tags=["streams"],
                responses={404: {"description": "no such stream"}})
    def delete_stream(stream_id: str):
        """Delete a stream (committed before the answer)."""
        if not table.delete(stream_id):
            raise HTTPException(404, detail=f"stream {stream_id!r}: no such stream")
        return Response(status_code=204)

    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    if config.token:
        app.add_middleware(BearerAuth, token=config.token)
    return app
