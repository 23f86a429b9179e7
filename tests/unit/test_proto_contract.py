"""The public package keeps its wire contract: what the last release had is still there, with the
same numbers and types (genrpc/proto_contract.py, protos/genrpc/v1/generation.fields.json)."""

import copy
import json

from genrpc.proto_contract import CONTRACT, breaking_changes, contract
from genrpc.v1 import generation_pb2


def test_the_public_package_is_wire_compatible_with_the_last_release():
    with open(CONTRACT) as f:
        released = json.load(f)
    assert breaking_changes(released, contract(generation_pb2.DESCRIPTOR)) == []


def test_the_check_sees_what_breaks_a_client():
    current = contract(generation_pb2.DESCRIPTOR)
    renumbered = copy.deepcopy(current)
    renumbered["messages"]["genrpc.v1.GenerationConfig"]["seed"][0] = 99
    retyped = copy.deepcopy(current)
    retyped["messages"]["genrpc.v1.GenerationConfig"]["max_new_tokens"][1] = "TYPE_INT64"
    for released in (renumbered, retyped):
        assert len(breaking_changes(released, current)) == 1
    assert breaking_changes(current, {**current, "rpcs": {}})  # an RPC gone
    # Moving plain fields into a new oneof keeps the wire; moving one into an existing oneof does not.
    plain = copy.deepcopy(current)
    for field in ("prompt", "chat"):
        plain["messages"]["genrpc.v1.GenerateStreamRequest"][field][3] = ""
    assert breaking_changes(plain, current) == []
    regrouped = copy.deepcopy(current)
    regrouped["messages"]["genrpc.v1.GenerateStreamRequest"]["config"][3] = "input"
    assert breaking_changes(current, regrouped)
    added = copy.deepcopy(current)
    added["messages"]["genrpc.v1.GenerationConfig"]["something_new"] = [99, "TYPE_INT32", False, ""]
    assert breaking_changes(current, added) == []  # additions are free
