"""Train -> export -> serving replicas -> ranking service, all real processes.

A small DLRM trains a few steps through 2 shard processes and checkpoints; the checkpoint
is exported; two serving replicas (``python -m recps.serving.main``) load it, and the
ranking service (``python -m recps.serving.ranking_server``) scores raw eval rows over
gRPC and HTTP. Its scores must equal the training model's on the same rows (through the
training shards). Then a replica is killed mid-traffic: no request may fail.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ps_harness import ShardGroup
from serving_harness import ServiceProcess

from recps.embedding import errors as E
from recps.proto import ranking_pb2, ranking_pb2_grpc
from recps.ps.client import PSClient
from recps.serving.client import ServingClient, ServingClientConfig
from recps.serving.export import ExportConfig, export_checkpoint
from recps.serving.ranking_server import RankingServer, RankingServerConfig, RankingService
from recps.worker.checkpoint import DENSE_FILE, latest_checkpoint, load_dense
from recps.worker.data import DataReader
from recps.worker.embedding import ShardedEmbeddingBagCollection, keyed_ids
from recps.worker.job_config import JobConfig, load_job_config
from recps.worker.synth import SynthConfig, write_dataset
from recps.worker.trainer import (
    WorkerContext,
    build_job_model,
    data_paths,
    embedding_collection_config,
    run_worker,
)

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
]

SPARSE = ("C1", "C2", "C3", "C4", "C5")
DENSE = tuple(f"I{i}" for i in range(1, 14))
STEPS, N = 8, 60


@dataclass
class Served:
    job: JobConfig
    client: PSClient
    step_dir: Path
    replicas: list[ServiceProcess]
    ranking: ServiceProcess
    rows: list[dict[str, Any]]  # raw eval rows, as a ranking client would send them
    want: np.ndarray  # the training model's scores of those rows
    models: Path  # the model root


def _job(data: Path, ckpt: Path) -> JobConfig:
    return load_job_config(
        {
            "data": {
                "train": str(data / "train"),
                "eval": str(data / "eval"),
                "batch_size": 128,
                "reader": {"dense_features": list(DENSE), "sparse_features": list(SPARSE)},
            },
            "table_defaults": {"dim": 8, "optimizer": {"kind": "adagrad", "lr": 0.1}},
            "model": {"kind": "dlrm", "bottom_mlp": [16, 8], "top_mlp": [16]},
            "dense_optimizer": {"kind": "adam", "lr": 0.01},
            "training": {
                "checkpoint_dir": str(ckpt),
                "steps": STEPS,
                "checkpoint_every_steps": STEPS,
            },
            "cluster": {"num_workers": 1},
        }
    )


def _training_scores(job: JobConfig, client: PSClient, step_dir: Path) -> tuple[Any, np.ndarray]:
    emb = ShardedEmbeddingBagCollection(
        embedding_collection_config(job), client, create_tables=False
    )
    model = build_job_model(job, emb)
    model.load_state_dict(load_dense((step_dir / DENSE_FILE).read_bytes())["model"])
    model.eval()
    reader = DataReader(data_paths(job)[1], job.data.reader.replace(batch_size=N))
    batch = next(iter(reader.epoch(0)))
    with torch.no_grad():  # eval lookups: unknown ids get initial vectors, nothing stored
        logits = model(torch.from_numpy(batch.dense), keyed_ids(batch))
    return batch, torch.sigmoid(logits).numpy()


def _raw_rows(job: JobConfig, n: int) -> tuple[list[dict[str, Any]], np.ndarray]:
    files = sorted(Path(data_paths(job)[1]).rglob("*.parquet"))
    table = pq.read_table(files[0]).slice(0, n)
    cols = {name: table.column(name).to_pylist() for name in (*DENSE, *SPARSE)}
    rows = [{k: v[i] for k, v in cols.items()} for i in range(table.num_rows)]
    return rows, np.asarray(table.column("label").to_pylist(), np.float32)


@pytest.fixture(scope="module")
def served(ps_module_group: ShardGroup, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("ranking")
    write_dataset(
        tmp / "data",
        SynthConfig(
            rows=3000,
            num_files=1,
            num_sparse=len(SPARSE),
            vocab_max=500,
            calibration_rows=1000,
            interaction_pairs=4,
        ),
    )
    job = _job(tmp / "data", tmp / "ckpt")
    cluster = ps_module_group.start(2)
    client = cluster.client()
    run_worker(job, client, WorkerContext(device="cpu"), progress=False)
    info = latest_checkpoint(job.training.checkpoint_dir)
    assert info is not None
    step_dir = Path(info.path)
    export_checkpoint(ExportConfig(str(step_dir), str(tmp / "models"), serving_shards=2))
    batch, want = _training_scores(job, client, step_dir)
    rows, labels = _raw_rows(job, N)
    np.testing.assert_array_equal(labels, batch.labels)  # the same rows on both sides
    replicas = [
        ServiceProcess(
            "recps.serving.main",
            ["--model", str(tmp / "models"), "--data-dir", str(tmp / f"r{i}"), "--port", "0"],
            tmp / f"r{i}.log",
        ).start()
        for i in range(2)
    ]
    # Two more replicas that each hold one serving shard: a client must route per shard.
    replicas += [
        ServiceProcess(
            "recps.serving.main",
            [
                "--model",
                str(tmp / "models"),
                "--data-dir",
                str(tmp / f"p{i}"),
                "--port",
                "0",
                "--shards",
                str(i),
            ],
            tmp / f"p{i}.log",
        ).start()
        for i in range(2)
    ]
    ranking = ServiceProcess(
        "recps.serving.ranking_server",
        [
            "--model",
            str(tmp / "models"),
            "--replicas",
            ",".join(r.address for r in replicas[:2]),
            "--port",
            "0",
            "--http-port",
            "0",
            "--watch-interval-s",
            "0",
            # The near cache on, sized in memory, but rows live 50 ms: repeated requests
            # still reach the replicas, so failover below is exercised.
            "--near-cache-ttl-s",
            "0.05",
            "--near-cache-mb",
            "2",
        ],
        tmp / "ranking.log",
    ).start()
    yield Served(job, client, step_dir, replicas, ranking, rows, want, tmp / "models")
    ranking.kill()
    for r in replicas:
        r.kill()
    client.close()


def _request(rows: list[dict[str, Any]], context: dict[str, Any] | None = None) -> Any:
    def fv(v: Any) -> ranking_pb2.FeatureValue:
        if v is None:
            return ranking_pb2.FeatureValue()
        if isinstance(v, str):
            return ranking_pb2.FeatureValue(str_value=v)
        if isinstance(v, float):
            return ranking_pb2.FeatureValue(float_value=v)
        return ranking_pb2.FeatureValue(int_value=int(v))

    req = ranking_pb2.PredictRequest(request_id="t-1")
    for k, v in (context or {}).items():
        req.context.values[k].CopyFrom(fv(v))
    for row in rows:
        c = req.candidates.add()
        for k, v in row.items():
            c.values[k].CopyFrom(fv(v))
    return req


def _stub(s: Served) -> ranking_pb2_grpc.RankingStub:
    return ranking_pb2_grpc.RankingStub(grpc.insecure_channel(s.ranking.address))


def _http(s: Served, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{s.ranking.ready['http_port']}{path}"
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read().decode()
            return resp.status, json.loads(text) if path != "/metrics" else text
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def test_partial_replicas_answer_like_a_full_one_and_like_training(served: Served) -> None:
    rng = np.random.default_rng(0)
    batch = {t: rng.integers(-(2**62), 2**62, 50) for t in SPARSE}
    full = ServingClient([served.replicas[0].address])
    partial = ServingClient([r.address for r in served.replicas[2:]])
    try:
        assert [r["shards"] for r in partial.stats()] == [[0], [1]]
        a, b = full.lookup(batch), partial.lookup(batch)
        want = served.client.lookup(batch, create_missing=False)  # the training shards
        for t in SPARSE:
            np.testing.assert_array_equal(a[t], b[t])
            np.testing.assert_array_equal(a[t], want[t])
    finally:
        full.close()
        partial.close()


def test_concurrent_lookups_share_rpcs_and_answer_like_single_calls(served: Served) -> None:
    rng = np.random.default_rng(1)
    pool_ids = rng.integers(-(2**62), 2**62, 200)  # a small pool: merged calls share ids
    batches = [{t: rng.choice(pool_ids, 40) for t in SPARSE[: 2 + k % 4]} for k in range(48)]
    for addrs in ([served.replicas[0].address], [r.address for r in served.replicas[2:]]):
        single = ServingClient(addrs, ServingClientConfig(coalesce_inflight=0))
        merged = ServingClient(addrs)
        try:
            want = [single.lookup(b) for b in batches]
            assert single.coalesce_stats() == {"batches": 0, "calls": 0}
            with ThreadPoolExecutor(8) as pool:
                got = list(pool.map(merged.lookup, batches))
            stats = merged.coalesce_stats()
            assert stats["calls"] == len(batches) and stats["batches"] < len(batches)
            for g, w, b in zip(got, want, batches):
                assert sorted(g) == sorted(b)
                for t in b:
                    np.testing.assert_array_equal(g[t], w[t])
            # A caller's unknown table fails that caller alone, not its batch-mates.
            out = merged._lookup_many([batches[0], {"nope": pool_ids[:3]}, batches[1]])
            assert isinstance(out[1], E.UnknownTableError) and "nope" in str(out[1])
            for g, w in ((out[0], want[0]), (out[2], want[1])):
                for t in w:
                    np.testing.assert_array_equal(g[t], w[t])
        finally:
            single.close()
            merged.close()


def test_grpc_scores_equal_the_training_model_on_raw_rows(served: Served) -> None:
    resp = _stub(served).Predict(_request(served.rows), timeout=60)
    assert resp.request_id == "t-1" and len(resp.scores) == N
    assert resp.model_version == STEPS
    np.testing.assert_allclose(np.array(resp.scores), served.want, rtol=1e-4, atol=1e-6)


def test_column_form_requests_score_the_same(served: Served) -> None:
    req = ranking_pb2.PredictRequest(request_id="cols")
    for name in (*DENSE, *SPARSE):
        vals = [r[name] for r in served.rows]
        col = req.columns[name]
        if name in DENSE:
            col.float_values.extend(float("nan") if v is None else float(v) for v in vals)
        else:  # the synthetic categoricals are int64 columns without nulls
            col.int_values.extend(vals)
    resp = _stub(served).Predict(req, timeout=60)
    np.testing.assert_allclose(np.array(resp.scores), served.want, rtol=1e-4, atol=1e-6)
    code, body = _http(
        served, "/predict", {"columns": {k: [r[k] for r in served.rows] for k in served.rows[0]}}
    )
    assert code == 200
    np.testing.assert_allclose(body["scores"], served.want, rtol=1e-4, atol=1e-6)
    bad = ranking_pb2.PredictRequest()
    bad.columns["C1"].int_values.extend([1, 2])
    bad.columns["C2"].int_values.extend([1, 2, 3])
    with pytest.raises(grpc.RpcError) as err:
        _stub(served).Predict(bad, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "C1 has 2, C2 has 3" in (err.value.details() or "")


def test_context_features_fill_what_candidates_leave_out(served: Served) -> None:
    # Split each row: dense features and C1 move to the context, so all candidates share
    # them; the scores must be those of the full rows with that context.
    ctx = {k: v for k, v in served.rows[0].items() if k in (*DENSE, "C1")}
    cands = [{k: v for k, v in r.items() if k not in ctx} for r in served.rows[:10]]
    full = [{**r, **ctx} for r in served.rows[:10]]
    split = _stub(served).Predict(_request(cands, ctx), timeout=60).scores
    whole = _stub(served).Predict(_request(full), timeout=60).scores
    np.testing.assert_allclose(split, whole, rtol=1e-6)


def test_http_predict_health_metrics_and_bad_input(served: Served) -> None:
    code, body = _http(served, "/predict", {"context": {}, "candidates": served.rows})
    assert code == 200
    np.testing.assert_allclose(body["scores"], served.want, rtol=1e-4, atol=1e-6)
    assert _http(served, "/healthz") == (200, {"status": "SERVING", "model_version": STEPS})
    code, text = _http(served, "/metrics")
    assert code == 200 and 'recps_predict_latency_seconds_count{endpoint="http"}' in text
    near = {
        line.split("{")[1].split("}")[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("recps_ranking_near_cache{")
    }
    assert near['stat="misses"'] > 0 and near['stat="rows"'] > 0, near
    assert {'stat="refreshed"', 'stat="refresh_failures"'} <= set(near), near
    assert 0 < near['stat="memory_bytes"'] <= 2 << 20, near  # --near-cache-mb 2
    # Lookups pinned to the tower's version, which the replicas serve: none fell back.
    assert "recps_ranking_unpinned_lookups_total 0.0" in text, text
    assert 10_000 < near['stat="capacity"'] < 262_144, near  # not the rows default
    merged = {
        line.split("{")[1].split("}")[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("recps_ranking_lookups_coalesced{")
    }
    assert merged['stat="calls"'] >= merged['stat="batches"'] > 0, merged
    code, body = _http(served, "/predict", raw=b"{not json")
    assert code == 400 and body["status"] == "INVALID_ARGUMENT"
    code, body = _http(served, "/predict", {"context": {}, "candidates": []})
    assert code == 400 and "at least one candidate" in body["error"]
    with pytest.raises(grpc.RpcError) as err:
        _stub(served).Predict(_request([]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Still serving after the bad requests.
    assert len(_stub(served).Predict(_request(served.rows[:3]), timeout=30).scores) == 3


def test_a_token_guards_predict_but_not_health(served: Served) -> None:
    cfg = RankingServerConfig(
        model=str(served.models),
        replicas=(served.replicas[1].address,),
        auth_token="s3cret",
        watch_interval_s=0,
    )
    server = RankingServer(RankingService(cfg)).start()
    try:
        channel = grpc.insecure_channel(server.address)
        stub = ranking_pb2_grpc.RankingStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(_request(served.rows[:2]), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(
                _request(served.rows[:2]), timeout=30, metadata=(("authorization", "Bearer nope"),)
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Predict(
            _request(served.rows), timeout=30, metadata=(("authorization", "Bearer s3cret"),)
        )
        np.testing.assert_allclose(np.array(ok.scores), served.want, rtol=1e-4, atol=1e-6)
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        url = f"http://127.0.0.1:{server.http_port}/predict"
        body = json.dumps({"candidates": served.rows[:2]}).encode()
        with pytest.raises(urllib.error.HTTPError) as http_err:
            urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30)
        assert http_err.value.code == 401
        req = urllib.request.Request(url, data=body, headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert len(json.loads(resp.read())["scores"]) == 2
        channel.close()
    finally:
        server.stop(grace_s=1)


def test_a_replica_killed_mid_traffic_fails_no_request(served: Served) -> None:
    stub = _stub(served)
    req = _request(served.rows[:20])
    stop, failures, done = threading.Event(), [], [0]

    def traffic() -> None:
        while not stop.is_set():
            try:
                got = stub.Predict(req, timeout=30).scores
                np.testing.assert_allclose(got, served.want[:20], rtol=1e-4, atol=1e-6)
                done[0] += 1
            except Exception as e:  # every failure counts
                failures.append(repr(e))

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    before = done[0]
    served.replicas[0].kill()  # SIGKILL: no goodbye
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures[:3]
    assert done[0] > before  # requests kept succeeding after the kill


def test_rank_cli_exits_1_with_a_reason_when_no_replica_answers(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    from recps.cli.main import main

    assert main(["rank", "--model", str(served.models), "--replicas", "127.0.0.1:1"]) == 1
    assert "no serving replica answered" in capsys.readouterr().err
