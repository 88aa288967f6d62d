#!/usr/bin/env python3
"""Subscribe to a running blink over gRPC and print each detection as one JSON line.

    python3 -m venv .venv && .venv/bin/pip install -r examples/python/requirements.txt
    .venv/bin/python examples/python/subscribe.py --addr 127.0.0.1:50051 --min-score 5
    .venv/bin/python examples/python/subscribe.py --timescale 3n,10n --cone 150.1,2.2,0.5
    .venv/bin/python examples/python/subscribe.py --after 41873     # resume after #41873
    BLINK_TOKEN=... .venv/bin/python examples/python/subscribe.py --addr blink.example.org:50051 --ca-cert ca.pem

The client code is generated at start from blink's own proto/blink/v1/blink.proto (found next
to this file in a checkout, or given with --proto), so it always matches the server's API. The
printed fields are those of `blink subscribe`. Keep the last "sequence" you printed: after a
disconnection, --after SEQUENCE gets everything since, while the server still holds it.
"""

import argparse
import atexit
import importlib
import json
import math
import os
import shutil
import sys
import tempfile

import grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROTO = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))


def load_api(proto_root):
    """Generate the Python modules for blink.v1 into a temporary folder and import them."""
    proto = os.path.join(proto_root, "blink", "v1", "blink.proto")
    if not os.path.isfile(proto):
        sys.exit(f"no blink.proto at {proto}: pass --proto PATH_TO/proto (the folder holding blink/v1/)")
    out = tempfile.mkdtemp(prefix="blink-proto-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    # grpc_tools ships the well-known types (google/protobuf/*.proto) in its _proto folder.
    well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}", proto]
    if protoc.main(args) != 0:
        sys.exit(f"protoc failed on {proto}")
    sys.path.insert(0, out)
    return importlib.import_module("blink.v1.blink_pb2"), importlib.import_module("blink.v1.blink_pb2_grpc")


def split(values):
    """Repeated or comma-separated option values, flattened."""
    return [v.strip() for vs in values or [] for v in vs.split(",") if v.strip()]


def as_json(d):
    return {
        "sequence": d.sequence,
        "id": d.id,
        "survey": d.survey,
        "alert_id": d.alert_id,
        "object_id": d.object_id,
        "ra": d.ra,
        "dec": d.dec,
        "mjd_tai": d.mjd_tai,
        "band": d.band,
        "score": d.score,
        "flux": d.flux,
        "flux_err": d.flux_err,
        "survey_snr": d.survey_snr if math.isfinite(d.survey_snr) else None,
        "detected": d.detected,
        "timescale": d.timescale,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", default="127.0.0.1:50051", help="server host:port (default %(default)s)")
    p.add_argument("--min-score", type=float, default=0.0, help="only |score| >= this many sigma (0: every result)")
    p.add_argument("--survey", action="append", help="only these surveys: ztf, rubin, native (repeat or comma-separate)")
    p.add_argument("--band", action="append", help="only these bands (repeat or comma-separate)")
    p.add_argument("--timescale", action="append", help="only these timescales: epoch, or a stack window such as 3n")
    p.add_argument("--cone", metavar="RA,DEC,RADIUS", help="only detections within this cone, degrees")
    p.add_argument("--object", action="append", help="only these object ids (repeat or comma-separate)")
    p.add_argument("--after", type=int, metavar="SEQUENCE", help="resume after this sequence number (0: everything the server still holds)")
    p.add_argument("--limit", type=int, help="stop after this many detections")
    p.add_argument("--timeout", type=float, help="give up after this many seconds")
    p.add_argument("--token", default=os.environ.get("BLINK_TOKEN"), help="bearer token, for a server with grpc.tokens (default: $BLINK_TOKEN)")
    p.add_argument("--ca-cert", metavar="PEM", help="CA of the server's certificate: connect with TLS (grpc.tls_cert)")
    p.add_argument("--proto", default=DEFAULT_PROTO, help="the proto folder of a blink checkout (default %(default)s)")
    a = p.parse_args()

    pb, rpc = load_api(a.proto)
    req = pb.SubscribeRequest(
        min_score=a.min_score,
        surveys=split(a.survey),
        bands=split(a.band),
        timescales=split(a.timescale),
        object_ids=split(a.object),
    )
    if a.cone:
        try:
            ra, dec, radius = (float(x) for x in a.cone.split(","))
        except ValueError:
            sys.exit(f"--cone {a.cone!r}: expected RA,DEC,RADIUS in degrees")
        req.cone.CopyFrom(pb.Cone(ra=ra, dec=dec, radius=radius))
    if a.after is not None:
        req.after_sequence = a.after

    addr = a.addr.removeprefix("http://").removeprefix("https://")
    if a.ca_cert:
        with open(a.ca_cert, "rb") as f:
            channel = grpc.secure_channel(addr, grpc.ssl_channel_credentials(root_certificates=f.read()))
    else:
        channel = grpc.insecure_channel(addr)
    metadata = [("authorization", f"Bearer {a.token}")] if a.token else None
    n = 0
    with channel:
        stub = rpc.BlinkStub(channel)
        try:
            for d in stub.Subscribe(req, timeout=a.timeout, metadata=metadata):
                print(json.dumps(as_json(d)), flush=True)
                n += 1
                if a.limit is not None and n >= a.limit:
                    break
        except grpc.RpcError as e:
            hint = ""
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                hint = " (resume with --after and the last sequence printed)"
            print(f"blink at {addr}: {e.code().name}: {e.details()}{hint}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
