"""The sidemesh.v1 contracts: services, streaming kinds, messages, comments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from sidemesh.v1 import agent_pb2, common_pb2, mcp_pb2, mesh_pb2, plugin_pb2, tool_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
FILES: list[FileDescriptor] = [
    m.DESCRIPTOR for m in (agent_pb2, common_pb2, mcp_pb2, mesh_pb2, plugin_pb2, tool_pb2)
]

UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI = "unary", "server-stream", "client-stream", "bidi"

# The contract's shape: every service, every RPC and its streaming kind.
EXPECTED_SERVICES = {
    "AgentService": {"Invoke": SERVER_STREAM, "Chat": BIDI},
    "ToolService": {"ListTools": UNARY, "CallTool": SERVER_STREAM},
    "McpService": {
        "GetServerInfo": UNARY,
        "ListTools": UNARY,
        "CallTool": SERVER_STREAM,
        "ListResources": UNARY,
        "ListResourceTemplates": UNARY,
        "ReadResource": UNARY,
        "ListPrompts": UNARY,
        "GetPrompt": UNARY,
        "Complete": UNARY,
        "Watch": SERVER_STREAM,
        "CallToolInteractive": BIDI,
    },
    "PluginService": {"Describe": UNARY, "Configure": UNARY, "Shutdown": UNARY},
    "MeshService": {
        "ListPlugins": UNARY,
        "GetPlugin": UNARY,
        "ListAgents": UNARY,
        "GetAgent": UNARY,
        "ListTools": UNARY,
        "GetTool": UNARY,
        "WatchEvents": SERVER_STREAM,
        "ListTraces": UNARY,
        "GetTrace": UNARY,
    },
}


def _kind(client_streaming: bool, server_streaming: bool) -> str:
    return {
        (False, False): UNARY,
        (False, True): SERVER_STREAM,
        (True, False): CLIENT_STREAM,
        (True, True): BIDI,
    }[(client_streaming, server_streaming)]


def _all_messages() -> list[Descriptor]:
    found: list[Descriptor] = []

    def walk(desc: Descriptor) -> None:
        if desc.GetOptions().map_entry:
            return
        found.append(desc)
        for nested in desc.nested_types:
            walk(nested)

    for file in FILES:
        for desc in file.message_types_by_name.values():
            walk(desc)
    return found


def test_every_file_is_in_the_sidemesh_v1_package() -> None:
    assert {f.package for f in FILES} == {"sidemesh.v1"}
    assert all(f.name.startswith("sidemesh/v1/") for f in FILES)


def test_services_have_the_expected_rpcs_and_streaming_kinds() -> None:
    services = {s.name: s for f in FILES for s in f.services_by_name.values()}
    assert set(services) == set(EXPECTED_SERVICES)
    for name, expected in EXPECTED_SERVICES.items():
        methods = services[name].methods_by_name
        actual = {m.name: _kind(m.client_streaming, m.server_streaming) for m in methods.values()}
        assert actual == expected, name


def test_rpc_request_and_response_types_are_unique() -> None:
    seen: set[str] = set()
    for file in FILES:
        for service in file.services_by_name.values():
            for method in service.methods_by_name.values():
                for message in (method.input_type, method.output_type):
                    assert message.full_name not in seen, message.full_name
                    seen.add(message.full_name)


def _fill(message: Message, depth: int = 0) -> None:
    """Sets every field of ``message`` to a non-default value (one oneof member)."""
    desc = message.DESCRIPTOR
    if desc.full_name == "google.protobuf.Struct":
        json_format.ParseDict({"k": [1.5, "s", True, None, {"n": 2.0}]}, message)
        return
    if desc.full_name == "google.protobuf.Value":
        json_format.ParseDict({"k": "v"}, message)
        return
    done_oneofs: set[str] = set()
    for field in desc.fields:
        if field.containing_oneof is not None:
            if field.containing_oneof.name in done_oneofs:
                continue
            done_oneofs.add(field.containing_oneof.name)
        _fill_field(message, field, depth)


def _sample_scalar(field: FieldDescriptor) -> object:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-value"
    if t == FieldDescriptor.TYPE_BYTES:
        return b"\x00\x01bytes"
    if t == FieldDescriptor.TYPE_BOOL:
        return True
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return 2.5
    if t == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number
    return 7


def _fill_field(message: Message, field: FieldDescriptor, depth: int) -> None:
    is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
    if is_map:
        value_field = field.message_type.fields_by_name["value"]
        getattr(message, field.name)["key"] = _sample_scalar(value_field)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        if depth > 4:
            return
        if field.is_repeated:
            _fill(getattr(message, field.name).add(), depth + 1)
        else:
            _fill(getattr(message, field.name), depth + 1)
            if not message.HasField(field.name):  # an empty message: mark it present
                getattr(message, field.name).SetInParent()
    elif field.is_repeated:
        getattr(message, field.name).append(_sample_scalar(field))
    else:
        setattr(message, field.name, _sample_scalar(field))


@pytest.mark.parametrize("desc", _all_messages(), ids=lambda d: d.full_name)
def test_every_message_round_trips_through_binary_and_json(desc: Descriptor) -> None:
    cls = GetMessageClass(desc)
    original = cls()
    _fill(original)
    if desc.fields:
        assert original.ListFields(), f"{desc.full_name} was not filled"

    decoded = cls.FromString(original.SerializeToString())
    assert decoded == original

    from_json = json_format.Parse(json_format.MessageToJson(original), cls())
    assert from_json == original


def test_an_invoke_response_is_a_valid_chat_response() -> None:
    event = agent_pb2.InvokeResponse(text_delta=agent_pb2.TextDelta(text="hi"))
    chat = agent_pb2.ChatResponse.FromString(event.SerializeToString())
    assert chat.WhichOneof("event") == "text_delta"
    assert chat.text_delta.text == "hi"


def _file_descriptor_set_with_comments() -> descriptor_pb2.FileDescriptorSet:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            "--include_source_info",
            "--descriptor_set_out=/dev/stdout",
            *sorted(str(p) for p in (PROTO_DIR / "sidemesh" / "v1").glob("*.proto")),
        ],
        check=True,
        capture_output=True,
    ).stdout
    return descriptor_pb2.FileDescriptorSet.FromString(out)


def _elements_without_comments(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    commented = {
        tuple(loc.path) for loc in file.source_code_info.location if loc.leading_comments.strip()
    }
    missing: list[str] = []

    def need(path: tuple[int, ...], what: str) -> None:
        if path not in commented:
            missing.append(f"{file.name}: {what}")

    # Field numbers of FileDescriptorProto / DescriptorProto / ... in descriptor.proto.
    def message(msg: descriptor_pb2.DescriptorProto, path: tuple[int, ...], name: str) -> None:
        need(path, f"message {name}")
        for i, field in enumerate(msg.field):
            need((*path, 2, i), f"field {name}.{field.name}")
        for i, nested in enumerate(msg.nested_type):
            if not nested.options.map_entry:
                message(nested, (*path, 3, i), f"{name}.{nested.name}")
        for i, enum in enumerate(msg.enum_type):
            enum_type(enum, (*path, 4, i), f"{name}.{enum.name}")
        for i, oneof in enumerate(msg.oneof_decl):
            if not oneof.name.startswith("_"):  # synthetic oneofs of `optional`
                need((*path, 8, i), f"oneof {name}.{oneof.name}")

    def enum_type(enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], n: str) -> None:
        need(path, f"enum {n}")
        for i, value in enumerate(enum.value):
            need((*path, 2, i), f"enum value {value.name}")

    for i, msg in enumerate(file.message_type):
        message(msg, (4, i), msg.name)
    for i, enum in enumerate(file.enum_type):
        enum_type(enum, (5, i), enum.name)
    for i, service in enumerate(file.service):
        need((6, i), f"service {service.name}")
        for j, method in enumerate(service.method):
            need((6, i, 2, j), f"rpc {service.name}.{method.name}")
    return missing


def test_every_service_rpc_message_field_and_enum_value_has_a_comment() -> None:
    fds = _file_descriptor_set_with_comments()
    assert len(fds.file) == len(FILES)
    missing = [m for f in fds.file for m in _elements_without_comments(f)]
    assert missing == []
