"""What makes the model call cheaper on a CPU, and whether it keeps a package's numbers: runtimes side by side.

For each package and each thread count (a replica of 1 CPU runs 1 thread; 2 threads fill this machine), in a
child process of its own (TensorFlow fixes its thread pools once per process), the served model (probability
and pooled embedding, ``models.ood.with_embedding``) run by:

- ``keras``: today's call, ``predict_on_batch`` (the reference);
- ``tf.function``: a ``tf.function`` with a fixed input signature, batches padded to 1/4/8/16/32 so that it
  never retraces; ``xla``: the same with ``jit_compile=True``;
- ``onnxruntime``: ``models.inference.OnnxPredictor`` (tf2onnx, threads sleeping between calls: the adopted
  runtime); ``onnxruntime-spin``: the same with ONNX Runtime's default spinning threads;
- ``openvino-f32``: ``openvino.convert_model`` of the same ``tf.function``, inference precision float32;
  ``openvino-default``: its default precision (bfloat16 on a CPU with AVX512-BF16).

Each is timed on real training films (never test) at batch 1, 8 and 32, and its numbers compared on the same
preprocessed films: against today's path in the evaluation's batches of 64 (max |dP| of the calibrated
probability, max relative difference of the OOD score and of the embedding, largest element over the
embedding's largest), and against itself in other batch layouts (1, 5, 8, 13, 32 and 64): served == offline
when the evaluation and the endpoint run the same runtime. Then the request's preprocessing, op by op (before)
and as one graph (``data.preprocessing.preprocess_one``, now), per image and bit for bit, and the in-process
ceiling as ``benchmarks/serve_load.py`` measures it (decode + preprocessing + model on batches of 32 of one
JPEG) with the old and new preprocessing and runtime. A second worker per package runs Keras with oneDNN off
(``TF_ENABLE_ONEDNN_OPTS=0``). A runtime that is not installed (OpenVINO is not a dependency: ``pip install
openvino`` to measure it) is reported as such. No assertions on time.

Usage: python -m benchmarks.inference_runtimes --package artifacts/VERSION [--package ...] [--films 64]
       [--seconds 2] [--threads 1,2] [--image TRAIN.jpeg] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

BATCHES = (1, 8, 32)
LAYOUTS = (1, 5, 8, 13, 32, 64)
BUCKETS = (1, 4, 8, 16, 32)
DEFAULT_IMAGE = "../shared/data/chest_xray/train/PNEUMONIA/person1002_bacteria_2933.jpeg"
Call = Callable[[np.ndarray], list[np.ndarray]]  # a batch -> [probability (n, 1), embedding (n, d)]


def _padded(function, tf) -> Call:
    """``function`` (a tf.function of fixed signature) on batches padded up to the next bucket: no retracing."""
    def call(batch: np.ndarray) -> list[np.ndarray]:
        parts = []
        for start in range(0, len(batch), BUCKETS[-1]):
            chunk = batch[start:start + BUCKETS[-1]]
            size = next(b for b in BUCKETS if b >= len(chunk))
            padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            parts.append([np.asarray(o)[:len(chunk)] for o in function(tf.constant(padded))])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
    return call


def _openvino(function, threads: int, precision: str | None) -> Call:
    import openvino

    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = openvino.Core().compile_model(openvino.convert_model(function.get_concrete_function()), "CPU", config)
    request = compiled.create_infer_request()
    outputs = compiled.outputs

    def call(batch: np.ndarray) -> list[np.ndarray]:
        result = request.infer({0: np.ascontiguousarray(batch, np.float32)})
        return [np.array(result[o]) for o in outputs]
    return call


def candidates(model, threads: int, onednn: bool) -> dict[str, Callable[[], Call]]:
    """Name -> a factory of the batch call (built lazily, so that one that fails to build is reported)."""
    import tensorflow as tf

    from models.inference import OnnxPredictor, to_onnx

    spec = [tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)]
    plain = tf.function(lambda x: model(x, training=False), input_signature=spec)
    made: dict[str, Callable[[], Call]] = {"keras": lambda: model.predict_on_batch,
                                           "tf.function": lambda: _padded(plain, tf)}
    if not onednn:
        return made

    def onnx(spin: bool) -> Call:
        if not spin:
            return OnnxPredictor(model, threads).predict_on_batch
        import onnxruntime  # ONNX Runtime's default: intra-op threads spin between calls

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(to_onnx(model), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda batch: session.run(None, {name: np.ascontiguousarray(batch, np.float32)})

    made.update({
        "xla": lambda: _padded(tf.function(lambda x: model(x, training=False), input_signature=spec,
                                           jit_compile=True), tf),
        "onnxruntime": lambda: onnx(False),
        "onnxruntime-spin": lambda: onnx(True),
        "openvino-f32": lambda: _openvino(plain, threads, "f32"),
        "openvino-default": lambda: _openvino(plain, threads, None),
    })
    return made


def _films(metadata, count: int) -> tuple[list[str], list[np.ndarray]]:
    """``count`` training films of the package's own split (a seeded, class-balanced subset): their paths and
    their model inputs."""
    from data.dataset import load_splits, stratified_subset
    from data.preprocessing import decode_image, preprocess

    data = metadata.config["data"]
    path = data["path"] or metadata.data.get("source")  # trained on $PNEUMONIA_DATA: where the evaluation read it
    train = load_splits(path, data["val_fraction"], data["seed"], validation=data["validation"]).train
    chosen = stratified_subset(train, count, seed=0)
    contract = metadata.input
    return list(chosen.paths), [preprocess(decode_image(Path(p).read_bytes()), contract.image_size,
                                           contract.intensity).numpy() for p in chosen.paths]


def _images_per_second(call: Call, batch: np.ndarray, seconds: float) -> float:
    call(batch)
    call(batch)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call(batch)
        images += len(batch)
    return images / (time.perf_counter() - start)


def _scored(call: Call, films: np.ndarray, batch: int, metadata, scorer) -> dict[str, np.ndarray]:
    """Calibrated P, OOD score and embedding of every film, scored in consecutive batches of ``batch``."""
    outputs = [call(films[i:i + batch]) for i in range(0, len(films), batch)]
    raw = np.concatenate([np.asarray(o[0]).reshape(-1) for o in outputs])
    embedding = np.concatenate([np.asarray(o[1]) for o in outputs]).astype(np.float64)
    score = scorer.score(embedding, raw) if scorer is not None else np.full(len(raw), np.nan)
    return {"p": metadata.probabilities(raw), "score": score, "embedding": embedding}


def _differences(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Max |dP|, max relative d(OOD score) (None without a gate), and the largest change of a film's embedding
    over that embedding's largest element."""
    scale = np.maximum(np.abs(reference["embedding"]).max(axis=1), 1e-12)
    embedding = np.abs(other["embedding"] - reference["embedding"]).max(axis=1) / scale
    score = None
    if not np.all(np.isnan(reference["score"])):
        score = float(np.nanmax(np.abs(other["score"] - reference["score"]) / np.abs(reference["score"])))
    return {"max_abs_dp": float(np.max(np.abs(other["p"] - reference["p"]))), "max_rel_dscore": score,
            "max_rel_dembedding": float(embedding.max())}


def decoders(contract) -> dict[str, Callable[[bytes], np.ndarray]]:
    """A request's bytes -> the model input, with the preprocessing run op by op (as before) or as one graph
    (``data.preprocessing.preprocess_one``, what ``serving.decode.decode_request`` runs now)."""
    from data.preprocessing import decode_image, preprocess
    from serving.decode import decode_request

    return {"eager": lambda body: preprocess(decode_image(body), contract.image_size, contract.intensity).numpy(),
            "graph": lambda body: decode_request(body, "image/jpeg", contract.image_size, 40_000_000,
                                                 contract.intensity)}


def preprocessing(bodies: list[bytes], contract, seconds: float) -> dict:
    """Per-image cost of each decoder over the films, and whether they give the same input bit for bit."""
    ways = decoders(contract)
    result: dict = {"max_abs_difference": float(max(np.max(np.abs(ways["eager"](b) - ways["graph"](b)))
                                                    for b in bodies))}
    for name, decode in ways.items():
        decode(bodies[0])
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            decode(bodies[done % len(bodies)])
            done += 1
        result[f"{name}_ms"] = 1e3 * (time.perf_counter() - start) / done
    return result


def ceiling_rate(call: Call, decode: Callable[[bytes], np.ndarray], body: bytes, seconds: float,
                 batch: int = 32) -> float:
    """serve_load's in-process ceiling with this call and decoder: decode + preprocessing + model, batches of 32,
    in images/s."""
    def one_batch() -> None:
        call(np.stack([decode(body) for _ in range(batch)]))

    one_batch()
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        one_batch()
        images += batch
    return images / (time.perf_counter() - start)


def worker(package: str, threads: int, films: int, seconds: float, image: str, onednn: bool) -> dict:
    """One child process: every candidate at ``threads`` threads, timed and compared."""
    from models.ood import with_embedding
    from models.package import load_model_dir, load_ood_scorer
    from runtime.tensorflow_setup import configure_tensorflow

    configure_tensorflow(threads, "float32")
    classifier, metadata = load_model_dir(package)
    scorer = load_ood_scorer(package, metadata)
    model = with_embedding(classifier)
    paths, arrays = _films(metadata, films)
    inputs = np.stack(arrays)
    reference = _scored(model.predict_on_batch, inputs, 64, metadata, scorer)  # the evaluation's layout today
    results: dict = {}
    calls: dict[str, Call] = {}
    for name, make in candidates(model, threads, onednn).items():
        name = name if onednn else f"{name} (oneDNN off)"
        row: dict = {}
        try:
            start = time.perf_counter()
            call = make()
            call(inputs[:1])
            row["build_s"] = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - not installed, or the converter refuses the model
            results[name] = {"unavailable": f"{type(exc).__name__}: {str(exc)[:400]}"}
            print(f"  {threads} thread(s) {name}: unavailable ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
            continue
        row["images_per_s"] = {str(b): _images_per_second(call, inputs[:b], seconds) for b in BATCHES}
        layouts = {b: _scored(call, inputs, b, metadata, scorer) for b in LAYOUTS}
        versus = [_differences(reference, s) for s in layouts.values()]
        row["vs_keras"] = {k: max((d[k] for d in versus if d[k] is not None), default=None) for k in versus[0]}
        own = [_differences(layouts[64], s) for b, s in layouts.items() if b != 64]
        if name in ("keras", "onnxruntime"):  # the parent compares thread counts: evaluation 2, a replica 1
            row["scored"] = {k: layouts[64][k].tolist() for k in ("p", "score")}
        row["own_layouts"] = {k: max((d[k] for d in own if d[k] is not None), default=None) for k in own[0]}
        results[name] = row
        calls[name] = call
        print(f"  {threads} thread(s) {name}: " + ", ".join(f"b{b} {v:.0f}" for b, v in row["images_per_s"].items())
              + f" img/s; vs keras dP {row['vs_keras']['max_abs_dp']:.1e}, own layouts dP "
              f"{row['own_layouts']['max_abs_dp']:.1e}", flush=True)
    out = {"films": len(inputs), "embedding_width": int(reference["embedding"].shape[1]), "candidates": results}
    if onednn:
        ways, body = decoders(metadata.input), Path(image).read_bytes()
        out["preprocessing"] = preprocessing([Path(p).read_bytes() for p in paths], metadata.input, seconds)
        out["ceilings"] = {f"{decoder} preprocessing, {runtime}": ceiling_rate(calls[runtime], ways[decoder], body,
                                                                              seconds * 2)
                           for decoder, runtime in (("eager", "keras"), ("graph", "keras"), ("graph", "onnxruntime"))
                           if runtime in calls}
    return out


def run_worker(package: str, threads: int, args, onednn: bool) -> dict:
    """``worker`` in a child process (its own TensorFlow thread pools, oneDNN on or off)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if not onednn:
        env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "-m", "benchmarks.inference_runtimes", "--worker", "--package", package,
                        "--threads", str(threads), "--films", str(args.films), "--seconds", str(args.seconds),
                        "--image", args.image, "--out", out.name] + ([] if onednn else ["--onednn-off"]),
                       check=True, env=env, cwd=Path(__file__).resolve().parents[1])
        return json.loads(Path(out.name).read_text())


def across_threads(by_threads: dict) -> dict[str, dict[str, float]]:
    """For keras and onnxruntime: how far one film's numbers move between thread counts (batches of 64)."""
    result = {}
    for name in ("keras", "onnxruntime"):
        runs = [run["candidates"][name]["scored"] for run in by_threads.values()
                if "scored" in run["candidates"].get(name, {})]
        if len(runs) < 2:
            continue
        p, score = (np.array([r[k] for r in runs], dtype=np.float64) for k in ("p", "score"))
        result[name] = {"max_abs_dp": float(np.max(np.ptp(p, axis=0))),
                        "max_rel_dscore": float(np.nanmax(np.ptp(score, axis=0) / np.abs(score[0])))}
    return result


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def print_table(results: dict) -> None:
    for package, by_threads in results["packages"].items():
        print(f"\n{package}")
        print("| runtime | threads | b1 img/s | b8 img/s | b32 img/s | b32 vs keras | vs keras: max abs dP | rel dOOD "
              "| rel dEmb | own layouts: max abs dP | rel dOOD |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for threads, run in by_threads.items():
            keras = run["candidates"]["keras"]["images_per_s"]["32"]
            for name, row in run["candidates"].items():
                if "unavailable" in row:
                    print(f"| {name} | {threads} | unavailable: {row['unavailable'][:120]} |")
                    continue
                ips, vs, own = row["images_per_s"], row["vs_keras"], row["own_layouts"]
                print(f"| {name} | {threads} | {ips['1']:.0f} | {ips['8']:.0f} | {ips['32']:.0f} | "
                      f"{ips['32'] / keras:.2f}x | {_fmt(vs['max_abs_dp'])} | {_fmt(vs['max_rel_dscore'])} | "
                      f"{_fmt(vs['max_rel_dembedding'])} | {_fmt(own['max_abs_dp'])} | {_fmt(own['max_rel_dscore'])} |")
        print("\n| threads | preprocessing eager ms | graph ms | max abs difference | ceiling: " +
              " | ".join(next(iter(by_threads.values()))["ceilings"]) + " |")
        print("|---|---|---|---|" + "---|" * len(next(iter(by_threads.values()))["ceilings"]))
        for threads, run in by_threads.items():
            pre = run["preprocessing"]
            print(f"| {threads} | {pre['eager_ms']:.2f} | {pre['graph_ms']:.2f} | {pre['max_abs_difference']:.1e} | "
                  + " | ".join(f"{v:.0f} img/s" for v in run["ceilings"].values()) + " |")
        for name, moved in across_threads(by_threads).items():
            print(f"{name}, one film across thread counts {', '.join(by_threads)}: max abs dP "
                  f"{_fmt(moved['max_abs_dp'])}, max rel dOOD {_fmt(moved['max_rel_dscore'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", action="append", required=True)
    parser.add_argument("--films", type=int, default=64, help="training films (never test) timed and compared")
    parser.add_argument("--seconds", type=float, default=2.0, help="per runtime and batch size")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="the JPEG of the ceiling rows (a training film)")
    parser.add_argument("--skip-onednn-off", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--onednn-off", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.package[0], int(args.threads), args.films, args.seconds, args.image, not args.onednn_off)
        Path(args.out).write_text(json.dumps(result))
        return
    results: dict = {"machine": f"{os.cpu_count()} CPUs", "seconds": args.seconds, "packages": {}}
    for package in args.package:
        by_threads: dict = {}
        for threads in (int(t) for t in args.threads.split(",")):
            print(f"{package}: {threads} thread(s)", flush=True)
            by_threads[str(threads)] = run_worker(package, threads, args, onednn=True)
            if not args.skip_onednn_off:
                off = run_worker(package, threads, args, onednn=False)
                by_threads[str(threads)]["candidates"].update(off["candidates"])
        results["packages"][package] = by_threads
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
