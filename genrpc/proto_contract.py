"""The public package's wire contract: every message field, enum value and RPC of
protos/genrpc/v1/generation.proto, by number and type, as a JSON file kept beside the .proto.

A test compares the current .proto with the file: nothing a released client relies on may change
number or type or go away; additions are free. When a release is cut, record it:

    python -m genrpc.proto_contract --write
"""

from __future__ import annotations

import argparse
import json
import os

from google.protobuf.descriptor import FieldDescriptor

from genrpc.stubs import PROTO_DIR

CONTRACT = os.path.join(PROTO_DIR, "genrpc", "v1", "generation.fields.json")


_TYPE_NAMES = {v: k for k, v in vars(FieldDescriptor).items() if k.startswith("TYPE_")}


def _type(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        return field.message_type.full_name
    if field.enum_type is not None:
        return field.enum_type.full_name
    return _TYPE_NAMES[field.type]


def _repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf 6+
        return bool(field.is_repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def contract(file_descriptor) -> dict:
    """{"messages": {name: {field: [number, type, repeated, oneof]}}, "enums": ..., "rpcs": ...}."""
    messages, enums, rpcs = {}, {}, {}

    def visit(message) -> None:
        messages[message.full_name] = {
            f.name: [f.number, _type(f), _repeated(f),
                     f.containing_oneof.name if f.containing_oneof and not f.containing_oneof.name.startswith("_")
                     else ""]
            for f in message.fields}
        for nested in message.nested_types:
            visit(nested)
        for enum in message.enum_types:
            enums[enum.full_name] = {v.name: v.number for v in enum.values}

    for message in file_descriptor.message_types_by_name.values():
        visit(message)
    for enum in file_descriptor.enum_types_by_name.values():
        enums[enum.full_name] = {v.name: v.number for v in enum.values}
    for service in file_descriptor.services_by_name.values():
        for method in service.methods:
            rpcs[f"{service.full_name}/{method.name}"] = [
                method.input_type.full_name, method.output_type.full_name,
                method.client_streaming, method.server_streaming]
    return {"messages": messages, "enums": enums, "rpcs": rpcs}


def _into_new_oneof(kind: str, was, now, fields_now: dict, fields_then: dict) -> bool:
    """A field that moved, number and type unchanged, into a oneof that did not exist before and
    whose members were all plain fields then: the same bytes on the wire. (A server that refused
    two of them set at once loses nothing: the last one set wins, as the oneof's documentation says.)"""
    if kind != "messages" or was[:3] != now[:3] or was[3] or not now[3]:
        return False
    members = [f for f, spec in fields_now.items() if spec[3] == now[3]]
    return all(f in fields_then and not fields_then[f][3] for f in members) and \
        not any(spec[3] == now[3] for spec in fields_then.values())


def breaking_changes(released: dict, current: dict) -> list[str]:
    """What `current` breaks of `released`, one line each (empty: wire-compatible)."""
    problems = []
    for kind in ("messages", "enums"):
        for name, members in released[kind].items():
            now = current[kind].get(name)
            if now is None:
                problems.append(f"{kind[:-1]} {name} was removed")
                continue
            for member, spec in members.items():
                if member not in now:
                    problems.append(f"{name}.{member} was removed (or renamed)")
                elif now[member] != spec and not _into_new_oneof(kind, spec, now[member], current[kind][name], members):
                    problems.append(f"{name}.{member} changed from {spec} to {now[member]}")
    for rpc, spec in released["rpcs"].items():
        if current["rpcs"].get(rpc) != spec:
            problems.append(f"rpc {rpc} changed from {spec} to {current['rpcs'].get(rpc)}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description="record the public package's wire contract")
    parser.add_argument("--write", action="store_true", help=f"write {os.path.relpath(CONTRACT)}")
    args = parser.parse_args()
    from genrpc.v1 import generation_pb2

    current = contract(generation_pb2.DESCRIPTOR)
    if args.write:
        with open(CONTRACT, "w") as f:
            json.dump(current, f, indent=1, sort_keys=True)
            f.write("\n")
    else:
        print(json.dumps(current, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
