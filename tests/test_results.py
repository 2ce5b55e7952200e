"""Task results are typed per task type (bus/results.py), decoded once where they are read; the
wire keeps its JSON object, so the format-1 fixture's results read as today's do."""

from __future__ import annotations

from pathlib import Path

from exojet.bus import subjects
from exojet.bus.codec import decode_event, decode_task
from exojet.bus.events import TaskStatusUpdated
from exojet.bus.ops.archive import read_archive
from exojet.bus.results import ChatResult, DownloadResult, LoadResult, result_as, wire
from exojet.bus.statuses import TaskStatus
from exojet.bus.tasks import task_type

FORMAT_1_LOG = Path(__file__).parent / "fixtures" / "log-format-1.jsonl.gz"
KINDS = {"DownloadModel": DownloadResult, "LoadModel": LoadResult, "ChatCompletion": ChatResult}


def test_every_result_in_the_format_1_log_reads_as_its_task_types() -> None:
    types: dict[str, str] = {}
    read: list[str] = []
    for env in read_archive(FORMAT_1_LOG):
        if env.subject.startswith(subjects.TASKS_PREFIX + "."):
            try:
                task = decode_task(env.data)
            except Exception:
                continue  # the fixture's one malformed task, on purpose
            types[task.task_id or str(env.seq)] = task_type(task)
        elif env.subject.startswith(subjects.RUNNER_EVENTS_PREFIX + "."):
            event = decode_event(env.data)
            if isinstance(event, TaskStatusUpdated) and event.task_status == TaskStatus.COMPLETE:
                kind = KINDS.get(types.get(event.task_id, ""))
                if kind is not None:
                    assert result_as(kind, event.result) is not None, (event.task_id, event.result)
                    read.append(kind.__name__)
    assert {"DownloadResult", "LoadResult", "ChatResult"} <= set(read)


def test_a_result_field_of_the_wrong_type_reads_as_not_reported_and_the_wire_is_an_object() -> None:
    assert result_as(DownloadResult, {"model_id": "m", "n_layers": "many"}) is None
    assert result_as(LoadResult, None) is None
    chat = ChatResult(text="hi", finish_reason="length", completion_tokens=2)
    assert wire(chat)["finish_reason"] == "length" and result_as(ChatResult, wire(chat)) == chat
