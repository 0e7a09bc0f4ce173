"""A bug in flip_ray's own code shows itself: the handlers that turn bad data into row or shard errors
(the readers, the prompt rendering, the log file) catch what bad data raises, and a bug injected
behind each of them propagates, ending `flip-ray` with its traceback and exit 4 instead of passing for
an unreadable file, a bad row or a quiet terminal.

    .venv/bin/python -m pytest -m "not slow" tests/test_bugs_show.py
    flock /tmp/flip_ray_engine.lock .venv/bin/python -m pytest tests/test_bugs_show.py -k through_ray   # slow
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from clusters import kill_processes_mentioning

from flip_ray.engine.generation import PromptFitter, render_rows
from flip_ray.input import readers as io
from flip_ray.input.files import InputError, list_shards
from flip_ray.input.readers import ColumnMapping, read_shard
from flip_ray.text.prompts import build_flip_messages
from flip_ray.text.rows import conversation_parts

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "flip_ray/samples/alpacaeval_sample.jsonl"


def injected_bug(*args, **kwargs):
    raise AttributeError("injected bug in flip_ray")


def write_rows(path: Path, n: int) -> Path:
    records = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:n]]
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n" for r in records))
    return path


def flip_ray_with(patch: str, args: list[str], env: dict | None = None, timeout: int = 300):
    """`flip-ray ARGS` in a child process, after running `patch` (Python that breaks a function)."""
    driver = f"import sys\n{patch}\nfrom flip_ray.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run(
        [sys.executable, "-c", driver, *args],
        cwd=REPO,
        env=env or {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- the readers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["text_field", "conversation_parts"])
def test_a_bug_in_the_row_rules_propagates_from_the_reader(tmp_path, monkeypatch, target):
    """The row rules run on every row after the file is read; a bug there is not "cannot read"."""
    chat = [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r", "messages": chat}) + "\n")
    mapping = ColumnMapping(messages="messages") if target == "conversation_parts" else ColumnMapping()
    shard = list_shards(str(path))[0]
    assert next(read_shard(shard, mapping, 8)).column("error").to_pylist() == [None]
    monkeypatch.setattr(io, target, injected_bug)
    with pytest.raises(AttributeError, match="injected bug"):
        next(read_shard(shard, mapping, 8))


def test_a_bug_while_reading_the_file_propagates_and_a_bad_file_stays_an_input_error(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(b'{"prompt": "a .jsonl.gz that is not gzip"}\n')
    shard = list_shards(str(path))[0]
    with pytest.raises(InputError, match="cannot read .*rows.jsonl.gz: BadGzipFile"):
        list(read_shard(shard, ColumnMapping(), 8))
    monkeypatch.setattr(io, "decode_json_line", injected_bug)
    shard = list_shards(str(write_rows(tmp_path / "rows.jsonl", 2)))[0]
    with pytest.raises(AttributeError, match="injected bug"):
        list(read_shard(shard, ColumnMapping(), 8))


def test_a_bug_in_the_column_check_ends_flip_ray_with_its_traceback_and_exit_4(tmp_path, embedded_model):
    """The columns of every file are checked on the driver before Ray starts (`io.peek_columns`):
    a bug there ends the run with its traceback and exit 4, not with "cannot read <file>" (exit 2)."""
    inp = write_rows(tmp_path / "in.jsonl", 2)
    args = ["score", f"input.path={inp}", f"output.path={tmp_path / 'out'}", "model.device=cpu"]
    done = flip_ray_with(
        "import flip_ray.input.readers\nflip_ray.input.readers._json_lines = lambda f, shard: f.no_such_method()", args
    )
    assert done.returncode == 4, done.stdout + done.stderr
    assert "Traceback" in done.stderr and "AttributeError" in done.stderr and "no_such_method" in done.stderr
    assert "this is a bug in flip_ray" in done.stderr.strip().splitlines()[-1]
    assert "cannot read" not in done.stderr
    # The same file through the unbroken code is fine: what failed was the injected bug.
    (tmp_path / "garbage.jsonl.gz").write_bytes(b"not gzip")
    args[1] = f"input.path={tmp_path / 'garbage.jsonl.gz'}"
    done = flip_ray_with("", args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cannot read" in done.stderr and "Traceback" not in done.stderr


BUGGY_READER = """
from flip_ray.input import readers as io
from flip_ray.job import stages


def read_shards(batch, **kwargs):
    # On the Ray worker: the row rules of this worker's reader get a bug.
    io.normalize = lambda *args: {}["a bug in the row rules"]
    yield from stages.read_shards(batch, **kwargs)
"""


@pytest.mark.slow
def test_a_bug_in_the_reader_on_a_ray_worker_shows_its_traceback_and_exit_4_through_ray(tmp_path, embedded_model):
    """The reader runs in Ray tasks: a KeyError in its row rules used to become "cannot read <file>"
    (a failed shard, exit 1). Now the remote traceback and exit 4."""
    inp = write_rows(tmp_path / "in.jsonl", 2)
    (tmp_path / "buggy_reader.py").write_text(BUGGY_READER)
    patch = (
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import ray.cloudpickle, buggy_reader, flip_ray.job.pipeline\n"
        "ray.cloudpickle.register_pickle_by_value(buggy_reader)  # the workers cannot import this test module\n"
        "flip_ray.job.pipeline.read_shards = buggy_reader.read_shards\n"
    )
    ray_tmp = tempfile.mkdtemp(prefix="frbug-", dir="/tmp")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    args = [
        "score", f"input.path={inp}", f"output.path={tmp_path / 'out'}", "model.device=cpu", "model.dtype=float32",
        "model.enforce_eager=true", "model.max_model_len=1024", "sampling.max_tokens=16",
    ]  # fmt: skip
    try:
        done = flip_ray_with(patch, args, env=env, timeout=900)
    finally:
        kill_processes_mentioning(ray_tmp)
    assert done.returncode == 4, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" in done.stderr and "KeyError: 'a bug in the row rules" in done.stderr
    # Ray's own shutdown lines may come after it; the verdict follows the traceback.
    assert done.stderr.rindex("this is a bug in flip_ray") > done.stderr.rindex("Traceback")
    assert "cannot read" not in done.stdout + done.stderr


# --- the prompt rendering ------------------------------------------------------------------------

# Mistral-7B-Instruct-v0.1's chat template: user and assistant turns only, alternating. A chat with a
# system turn is a row it refuses (jinja2 TemplateError from `raise_exception`), not a bug.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
CHATS = [
    [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."},
    ],
]


@pytest.fixture
def tokenizer(embedded_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model)


def failed(message: str, truncated: bool) -> str:
    return f"failed: {message}"


def test_a_row_the_chat_template_or_the_tokenizer_refuses_is_a_row_error(tokenizer):
    """Rows rendered as `pmi_forward` renders them (the chat's own turns through the model's chat
    template) with a real tokenizer: a system turn the template refuses, and a lone surrogate the
    tokenizer refuses, fail alone; the other rows render."""
    smollm = PromptFitter(tokenizer)
    tokenizer.chat_template = MISTRAL_TEMPLATE  # the same tokenizer, under a template that refuses some chats
    mistral = PromptFitter(tokenizer)
    renders = []
    for chat in CHATS:
        instruction, _, context = conversation_parts(chat)
        renders.append(lambda c=context, q=instruction: (mistral.ids([*c, {"role": "user", "content": q}]), False, q))
    renders.append(lambda: (smollm.encode("broken \ud800 text"), False, None))
    results, rendered = render_rows(renders, failed)
    assert results[0] is None and [(i, state) for i, _, _, state in rendered] == [(0, "Name a fruit.")]
    assert tokenizer.decode(rendered[0][1]).endswith("[INST] Name a fruit. [/INST]")
    assert results[1] == (
        "failed: the chat template refused the row: TemplateError: "
        "Conversation roles must alternate user/assistant/user/assistant/..."
    )
    assert results[2] == "failed: the text holds an unpaired UTF-16 surrogate (\\ud800): not valid Unicode"


def test_a_bug_in_the_prompt_code_propagates_from_the_render_step(tokenizer, monkeypatch):
    """The FLIP prompt as the engine renders it; a bug injected into the prompt builder raises out
    of `render_rows` (and so out of the engine actor) instead of becoming every row's error."""
    fitter = PromptFitter(tokenizer)

    def render():
        ids, truncated = fitter.fit(lambda t, c: build_flip_messages(t[0], c), ["Apple."], None, 900, "the FLIP prompt")
        return ids, truncated, None

    results, rendered = render_rows([render], failed)
    assert results == [None] and len(rendered[0][1]) > 50
    too_small = lambda: (*fitter.fit(lambda t, c: build_flip_messages(t[0], c), ["Apple."], None, 5, "it"), None)  # noqa: E731
    assert render_rows([too_small], failed)[0][0].startswith("failed: it does not fit the model window")
    monkeypatch.setattr("flip_ray.text.prompts.build_flip_user_message", injected_bug)
    with pytest.raises(AttributeError, match="injected bug"):
        render_rows([render], failed)


# --- the log file ------------------------------------------------------------------------------------

CONSOLE_RUN = """
import logging, subprocess, sys
from pathlib import Path
from flip_ray.job.console import Console

log_dir = Path(sys.argv[1])
with Console(log_dir) as console:
    console.log.name = "run.log"  # a symlink to /dev/full: every write to it fails with ENOSPC
    console.capture_process_output()  # as when Ray starts: fd 1 and 2 now write to the log too
    subprocess.run(["echo", "a child's output, meant for the log"])
    console.say("first line")
    print("a library's print, meant for the log")
    logging.getLogger("ray.data").warning("a library's warning, meant for the log")
    print("more for the log " * 200)
    console.say("second line")
print("after the run", file=sys.stderr)
"""


def test_a_log_file_that_cannot_be_written_is_said_once_and_the_terminal_keeps_flip_rays_lines(tmp_path):
    """The log file on a full disk (/dev/full answers every write with ENOSPC, as a full file system
    does): flip_ray's lines still reach the terminal, the failure is said there once, no library
    print raises, and what comes after the run reaches stderr (the fds were given back)."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "run.log").symlink_to("/dev/full")
    done = subprocess.run(
        [sys.executable, "-c", CONSOLE_RUN, str(tmp_path / "logs")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    warned = [line for line in lines if "cannot write the log file" in line]
    assert len(warned) == 1, lines
    assert warned[0].startswith(f"flip-ray: warning: cannot write the log file {tmp_path / 'logs' / 'run.log'}: ")
    assert "No space left on device" in warned[0]
    assert "flip-ray: first line" in lines and "flip-ray: second line" in lines
    assert "meant for the log" not in done.stdout + done.stderr and "Logging error" not in done.stderr
    assert done.stderr.strip() == "after the run"


def test_no_log_file_at_all_is_said_on_the_terminal(tmp_path):
    """Neither output.path/logs/ nor ./flip_ray_logs/ can be created: said once, not a silent /dev/null."""
    (tmp_path / "output").write_text("a file where the output directory should be")
    (tmp_path / "flip_ray_logs").write_text("a file, not a directory")
    code = (
        "import sys\nfrom pathlib import Path\nfrom flip_ray.job.console import Console\n"
        "with Console(Path(sys.argv[1])) as console:\n"
        "    console.say('a line')\n    print('for the log')\n    assert console.path is None\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "output" / "logs")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and "flip-ray: a line" in lines, lines
    warning = next(line for line in lines if line != "flip-ray: a line")
    assert warning.startswith("flip-ray: warning: cannot create a log file (") and "flip_ray_logs" in warning
    assert "for the log" not in done.stdout + done.stderr
