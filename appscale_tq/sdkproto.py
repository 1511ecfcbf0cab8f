"""The App Engine SDK's wire messages (remote_api envelope and TaskQueue service), declared
here as protobuf descriptors with the SDK's own field numbers; pure.

Field numbers follow ``google/appengine/api/taskqueue/taskqueue_service_bytes.proto`` and
``google/appengine/ext/remote_api/remote_api_bytes.proto`` (proto2, with groups). Only the
messages the node handles are declared; fields it never reads keep their wire type (a datastore
transaction is read as opaque bytes), so any SDK request parses.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F = descriptor_pb2.FieldDescriptorProto
OPT, REQ, REP = F.LABEL_OPTIONAL, F.LABEL_REQUIRED, F.LABEL_REPEATED
BYTES, STRING, INT32, INT64, DOUBLE, BOOL = (
    F.TYPE_BYTES, F.TYPE_STRING, F.TYPE_INT32, F.TYPE_INT64, F.TYPE_DOUBLE, F.TYPE_BOOL)
MESSAGE, GROUP, ENUM = F.TYPE_MESSAGE, F.TYPE_GROUP, F.TYPE_ENUM

PACKAGE = "appscale_tq.sdk"

ERROR_CODES = {
    "OK": 0, "UNKNOWN_QUEUE": 1, "TRANSIENT_ERROR": 2, "INTERNAL_ERROR": 3, "TASK_TOO_LARGE": 4,
    "INVALID_TASK_NAME": 5, "INVALID_QUEUE_NAME": 6, "INVALID_URL": 7, "INVALID_QUEUE_RATE": 8,
    "PERMISSION_DENIED": 9, "TASK_ALREADY_EXISTS": 10, "TOMBSTONED_TASK": 11, "INVALID_ETA": 12,
    "INVALID_REQUEST": 13, "UNKNOWN_TASK": 14, "TOMBSTONED_QUEUE": 15, "DUPLICATE_TASK_NAME": 16,
    "SKIPPED": 17, "TOO_MANY_TASKS": 18, "INVALID_PAYLOAD": 19, "INVALID_RETRY_PARAMETERS": 20,
    "INVALID_QUEUE_MODE": 21, "QUEUE_PAUSED": 26, "INVALID_DISPATCH_DEADLINE": 29,
}
METHODS = {1: "GET", 2: "POST", 3: "HEAD", 4: "PUT", 5: "DELETE"}
METHOD_NUMBERS = {v: k for k, v in METHODS.items()}
# remote_api RpcError codes
CALL_NOT_FOUND = 1
PARSE_ERROR = 2
SECURITY_VIOLATION = 3
BAD_REQUEST = 8


def _field(msg: Any, name: str, number: int, ftype: int, label: int = OPT,
           type_name: str | None = None, default: str | None = None) -> None:
    f = msg.field.add(name=name, number=number, type=ftype, label=label)
    if type_name:
        f.type_name = f".{PACKAGE}.{type_name}"
    if default is not None:
        f.default_value = default


def _file() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name="appscale_tq/sdk.proto", package=PACKAGE,
                                            syntax="proto2")

    def message(name: str, *fields: tuple[Any, ...], parent: Any = None) -> Any:
        m = (parent.nested_type if parent is not None else fd.message_type).add(name=name)
        for spec in fields:
            _field(m, *spec)
        return m

    # remote_api envelope
    message("Request", ("service_name", 2, STRING, REQ), ("method", 3, STRING, REQ),
            ("request", 4, BYTES, REQ), ("request_id", 5, STRING), ("trace_context", 6, BYTES))
    message("ApplicationError", ("code", 1, INT32, REQ), ("detail", 2, STRING, REQ))
    message("RpcError", ("code", 1, INT32, REQ), ("detail", 2, STRING))
    message("Response", ("response", 1, BYTES), ("exception", 2, BYTES),
            ("application_error", 3, MESSAGE, OPT, "ApplicationError"),
            ("java_exception", 4, BYTES), ("rpc_error", 5, MESSAGE, OPT, "RpcError"))

    message("RetryParameters", ("retry_limit", 1, INT32), ("age_limit_sec", 2, INT64),
            ("min_backoff_sec", 3, DOUBLE, OPT, None, "0.1"),
            ("max_backoff_sec", 4, DOUBLE, OPT, None, "3600"),
            ("max_doublings", 5, INT32, OPT, None, "16"))
    message("Acl", ("user_email", 1, BYTES, REP), ("writer_email", 2, BYTES, REP))
    message("HttpHeader", ("key", 1, BYTES, REQ), ("value", 2, BYTES, REQ))

    add = message(
        "AddRequest",
        ("queue_name", 1, BYTES, REQ), ("task_name", 2, BYTES, REQ), ("eta_usec", 3, INT64, REQ),
        ("url", 4, BYTES), ("method", 5, INT32, OPT, None, "2"),
        ("header", 6, GROUP, REP, "AddRequest.Header"), ("body", 9, BYTES),
        ("transaction", 10, BYTES), ("app_id", 11, BYTES),
        ("crontimetable", 12, GROUP, OPT, "AddRequest.CronTimetable"),
        ("description", 15, BYTES), ("payload", 16, BYTES),
        ("retry_parameters", 17, MESSAGE, OPT, "RetryParameters"), ("mode", 18, INT32),
        ("tag", 19, BYTES), ("cron_retry_parameters", 20, MESSAGE, OPT, "RetryParameters"),
        ("datastore_transaction", 21, BYTES), ("dispatch_deadline_usec", 22, INT64),
    )
    message("Header", ("key", 7, BYTES, REQ), ("value", 8, BYTES, REQ), parent=add)
    message("CronTimetable", ("schedule", 13, BYTES, REQ), ("timezone", 14, BYTES, REQ),
            parent=add)
    message("AddResponse", ("chosen_task_name", 1, BYTES))
    message("BulkAddRequest", ("add_request", 1, MESSAGE, REP, "AddRequest"))
    bulk = message("BulkAddResponse", ("taskresult", 1, GROUP, REP, "BulkAddResponse.TaskResult"))
    message("TaskResult", ("result", 2, INT32, REQ), ("chosen_task_name", 3, BYTES), parent=bulk)
    message("DeleteRequest", ("queue_name", 1, BYTES, REQ), ("task_name", 2, BYTES, REP),
            ("app_id", 3, BYTES))
    message("DeleteResponse", ("result", 3, INT32, REP))
    message("PurgeQueueRequest", ("app_id", 1, BYTES), ("queue_name", 2, BYTES, REQ))
    message("PurgeQueueResponse")
    message("ScannerQueueInfo", ("executed_last_minute", 1, INT64, REQ),
            ("executed_last_hour", 2, INT64, REQ), ("sampling_duration_seconds", 3, DOUBLE, REQ),
            ("requests_in_flight", 4, INT32), ("enforced_rate", 5, DOUBLE))
    message("FetchQueueStatsRequest", ("app_id", 1, BYTES), ("queue_name", 2, BYTES, REP),
            ("max_num_tasks", 3, INT32))
    stats = message("FetchQueueStatsResponse",
                    ("queuestats", 1, GROUP, REP, "FetchQueueStatsResponse.QueueStats"))
    message("QueueStats", ("num_tasks", 2, INT32, REQ), ("oldest_eta_usec", 3, INT64, REQ),
            ("scanner_info", 4, MESSAGE, OPT, "ScannerQueueInfo"), parent=stats)
    message("PauseQueueRequest", ("app_id", 1, BYTES, REQ), ("queue_name", 2, BYTES, REQ),
            ("pause", 3, BOOL, REQ))
    message("PauseQueueResponse")
    message("UpdateQueueRequest", ("app_id", 1, BYTES), ("queue_name", 2, BYTES, REQ),
            ("bucket_refill_per_second", 3, DOUBLE, REQ), ("bucket_capacity", 4, INT32, REQ),
            ("user_specified_rate", 5, STRING),
            ("retry_parameters", 6, MESSAGE, OPT, "RetryParameters"),
            ("max_concurrent_requests", 7, INT32), ("mode", 8, INT32),
            ("acl", 9, MESSAGE, OPT, "Acl"), ("header_override", 10, MESSAGE, REP, "HttpHeader"))
    message("UpdateQueueResponse")
    message("FetchQueuesRequest", ("app_id", 1, BYTES), ("max_rows", 2, INT32, REQ))
    queues = message("FetchQueuesResponse", ("queue", 1, GROUP, REP, "FetchQueuesResponse.Queue"))
    message("Queue", ("queue_name", 2, BYTES, REQ), ("bucket_refill_per_second", 3, DOUBLE, REQ),
            ("bucket_capacity", 4, DOUBLE, REQ), ("user_specified_rate", 5, STRING),
            ("paused", 6, BOOL, REQ), ("retry_parameters", 7, MESSAGE, OPT, "RetryParameters"),
            ("max_concurrent_requests", 8, INT32), ("mode", 9, INT32),
            ("acl", 10, MESSAGE, OPT, "Acl"), ("header_override", 11, MESSAGE, REP, "HttpHeader"),
            ("creator_name", 12, STRING, OPT, None, "apphosting"), parent=queues)
    # proto2 groups: the field is the lower-cased name of a nested message of the same name
    return fd


def _classes() -> dict[str, Any]:
    pool = descriptor_pool.DescriptorPool()
    file_desc = pool.Add(_file())
    del file_desc
    out: dict[str, Any] = {}
    fd = pool.FindFileByName("appscale_tq/sdk.proto")

    def collect(desc: Any, prefix: str = "") -> None:
        out[prefix + desc.name] = message_factory.GetMessageClass(desc)
        for nested in desc.nested_types:
            collect(nested, prefix + desc.name + ".")

    for desc in fd.message_types_by_name.values():
        collect(desc)
    return out


MESSAGES = _classes()
Request = MESSAGES["Request"]
Response = MESSAGES["Response"]
AddRequest = MESSAGES["AddRequest"]
AddResponse = MESSAGES["AddResponse"]
BulkAddRequest = MESSAGES["BulkAddRequest"]
BulkAddResponse = MESSAGES["BulkAddResponse"]
DeleteRequest = MESSAGES["DeleteRequest"]
DeleteResponse = MESSAGES["DeleteResponse"]
PurgeQueueRequest = MESSAGES["PurgeQueueRequest"]
PurgeQueueResponse = MESSAGES["PurgeQueueResponse"]
FetchQueueStatsRequest = MESSAGES["FetchQueueStatsRequest"]
FetchQueueStatsResponse = MESSAGES["FetchQueueStatsResponse"]
PauseQueueRequest = MESSAGES["PauseQueueRequest"]
PauseQueueResponse = MESSAGES["PauseQueueResponse"]
UpdateQueueRequest = MESSAGES["UpdateQueueRequest"]
UpdateQueueResponse = MESSAGES["UpdateQueueResponse"]
FetchQueuesRequest = MESSAGES["FetchQueuesRequest"]
FetchQueuesResponse = MESSAGES["FetchQueuesResponse"]
