"""The bad inputs of tests/test_bad_input.py, as tables: each case the input, the words its one-line error must
contain, and (while the fix has not landed) a strict xfail naming the issue item and its owner.

CLI cases are functions of the case's Ctx (its store URL `c.db`, a folder `c.dir`, `c.file(name, content)`) that
return the argv; store cases are functions of (store, the seed's ids) that must raise a UserError.
"""

from __future__ import annotations

import json
import socket

import pytest

SECRET = "S3cretPw"  # in database URLs that cannot connect: it must never be printed
DEAD_PG = f"postgresql+psycopg2://rlhf:{SECRET}@127.0.0.1:1/rlhf"


def jl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def xfail(param_id: str, item: int, owner: str):
    return pytest.mark.xfail(strict=True, reason=f"issue 24 item {item}: {owner} fix not landed")


# ---------------------------------------------------------------- inputs: files and rows

PREF = {"prompt": "Say hello.", "chosen": "Hello!", "rejected": "Go away."}
HUMAN = "\n\nHuman: Hi there\n\nAssistant: "
TASK = {"prompt": "Pick one.", "responses": [{"text": "one"}, {"text": "two"}],
        "votes": [{"annotator": "imp", "choice": "A", "strength": 2}]}
RANK = {"prompt": "Rank these.", "kind": "rank", "responses": [{"text": "a"}, {"text": "b"}, {"text": "c"}],
        "votes": [{"annotator": "imp", "choice": "ranked", "ranking": [[0], [1], [2]], "shown": [0, 1, 2]}]}


def vote(**changes) -> dict:
    return {**TASK, "votes": [{**TASK["votes"][0], **changes}]}


def imp(name: str, content, *flags: str):
    """`rlhf data import` of a file holding `content`."""
    return lambda c: ["data", "import", "--db", c.db, "--file", c.file(name, content), *flags]


def fail(name: str, content):
    return imp(name, content, "--kind", "preferences", "--on_bad_row", "fail")


def export(*flags: str):
    return lambda c: ["data", "export", "--db", c.db, "--out", str(c.dir / "export"), *flags]


def with_config(command: list[str], yaml_text: str | bytes, name: str = "bad.yaml"):
    """A command with `--config` a file holding `yaml_text`; the store options of data commands point at ours."""
    def argv(c):
        store = ["--db", c.db] if command[0] in ("data", "label-sim", "generate") else []
        return [*command, "--config", c.file(name, yaml_text), *store]
    return argv


def cli_case(id_: str, argv, expected: str, item: int | None = None, owner: str = ""):
    marks = [xfail(id_, item, owner)] if item else []
    return pytest.param(argv, expected, id=id_, marks=marks)


IMPORT_CASES = [
    cli_case("import-no-file", lambda c: ["data", "import", "--db", c.db], "--file"),
    cli_case("import-missing-file", lambda c: ["data", "import", "--db", c.db, "--file", str(c.dir / "nope.jsonl")],
             "nope.jsonl"),
    cli_case("import-unsupported-type", imp("prompts.txt", "hello\n"), "prompts.txt"),
    cli_case("import-jsonl-not-utf8", imp("p.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'), r"p.jsonl:2"),
    cli_case("import-csv-not-utf8", imp("p.csv", b"prompt\nok\ncaf\xe9\n"), r"p.csv:3"),
    cli_case("import-json-malformed", imp("p.json", '[{"prompt": "a"},\n {"prompt": }]'), r"p.json:2"),
    cli_case("import-json-not-a-list", imp("p.json", '{"prompt": "a"}'), r"p.json"),
    cli_case("import-parquet-garbage", imp("p.parquet", b"PAR1 this is not parquet at all"), r"p.parquet"),
    cli_case("import-jsonl-bad-line", imp("p.jsonl", '{"prompt": "a"}\n{"prompt": \n'), r"p.jsonl:2"),
    cli_case("import-jsonl-a-list", imp("p.jsonl", '["a", "b"]\n'), r"p.jsonl:1"),
    cli_case("import-empty-file", imp("p.jsonl", ""), r"p.jsonl"),
    cli_case("import-prompt-empty", imp("p.jsonl", jl({"prompt": "ok"}, {"prompt": "   "})), r"p.jsonl:2"),
    cli_case("import-prompt-duplicate", imp("p.jsonl", jl({"prompt": "a"}, {"prompt": "a"})), r"p.jsonl:2"),
    cli_case("import-prompt-bad-messages", imp("p.jsonl", jl({"messages": [{"role": "user"}]})), r"p.jsonl:1"),
    cli_case("import-prompt-split-a-list", imp("p.jsonl", jl({"prompt": "a", "split": ["train"]})),
             r"p.jsonl:1.*split"),
    cli_case("import-prompt-split-too-long", imp("p.jsonl", jl({"prompt": "a", "split": "s" * 40})), r"p.jsonl:1"),
    cli_case("import-prompt-source-a-number", imp("p.jsonl", jl({"prompt": "a", "source": 7})), r"p.jsonl:1"),
    cli_case("import-csv-no-prompt-column", imp("p.csv", "text\nhello\n"), r"p.csv:2"),
    cli_case("import-prompts-bad-last-row", imp("p.jsonl", jl(*[{"prompt": f"p{i}"} for i in range(50)],
                                                             {"prompt": ""})), r"p.jsonl:51"),
    cli_case("import-pref-same-response", fail("f.jsonl", jl(PREF, {**PREF, "rejected": "Hello!"})),
             r"f.jsonl:2.*same"),
    cli_case("import-pref-nan-margin", fail("f.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c", '
                                                       '"margin": NaN}\n'), r"f.jsonl:1.*margin"),
    cli_case("import-pref-margin-text", fail("f.jsonl", jl({**PREF, "margin": "abc"})), r"f.jsonl:1.*margin"),
    cli_case("import-pref-margin-csv", fail("f.csv", "prompt,chosen,rejected,margin\na,b,c,abc\n"),
             r"f.csv:2.*margin"),
    cli_case("import-pref-unknown-role", fail("f.jsonl", jl({**PREF, "prompt": [{"role": "wizard", "content": "x"}]})),
             r"f.jsonl:1.*role"),
    cli_case("import-pref-empty-chosen", fail("f.jsonl", jl({**PREF, "chosen": "  "})), r"f.jsonl:1.*chosen"),
    cli_case("import-pref-chosen-a-number", fail("f.jsonl", jl({**PREF, "chosen": 5})), r"f.jsonl:1"),
    cli_case("import-pref-missing-rejected", fail("f.jsonl", jl({"prompt": "a", "chosen": "b"})), r"f.jsonl:1"),
    cli_case("import-hh-empty-reply", fail("hh.jsonl", jl({"chosen": HUMAN + "Hello", "rejected": HUMAN.rstrip()})),
             r"hh.jsonl:1"),
    cli_case("import-hh-histories-differ", fail("hh.jsonl", jl({"chosen": HUMAN + "Hello",
                                                               "rejected": "\n\nHuman: Bye\n\nAssistant: Go"})),
             r"hh.jsonl:1"),
    cli_case("import-hh-not-a-transcript", fail("hh.jsonl", jl({"chosen": "hello", "rejected": "bye"})),
             r"hh.jsonl:1"),
    cli_case("import-pref-no-good-row-skip", imp("f.jsonl", jl({**PREF, "chosen": ""}), "--kind", "preferences"),
             r"f.jsonl"),
    cli_case("import-pref-duplicate-row", imp("f.jsonl", jl(PREF, PREF), "--kind", "preferences"), r"f.jsonl:2"),
    cli_case("import-task-ranking-too-short", imp("t.jsonl", jl({**RANK, "votes": [{**RANK["votes"][0],
                                                                                    "ranking": [[0]]}]})),
             r"t.jsonl:1.*ranking"),
    cli_case("import-task-unknown-kind", imp("t.jsonl", jl({**TASK, "kind": "duel"})), r"t.jsonl:1.*kind"),
    cli_case("import-task-strength-7", imp("t.jsonl", jl(vote(strength=7))), r"t.jsonl:1.*strength"),
    cli_case("import-task-strength-text", imp("t.jsonl", jl(vote(strength="strong"))), r"t.jsonl:1.*strength"),
    cli_case("import-task-choice-C", imp("t.jsonl", jl(vote(choice="C"))), r"t.jsonl:1.*choice"),
    cli_case("import-task-seconds-text", imp("t.jsonl", jl(vote(seconds="abc"))), r"t.jsonl:1.*seconds"),
    cli_case("import-task-seconds-negative", imp("t.jsonl", jl(vote(seconds=-3))), r"t.jsonl:1.*seconds"),
    cli_case("import-task-left-C", imp("t.jsonl", jl(vote(left="C"))), r"t.jsonl:1.*left"),
    cli_case("import-task-review-maybe", imp("t.jsonl", jl(vote(review="maybe"))), r"t.jsonl:1.*review"),
    cli_case("import-task-margin-nan", imp("t.jsonl", jl(vote(margin="nan"))), r"t.jsonl:1.*margin"),
    cli_case("import-task-model-p-2", imp("t.jsonl", jl(vote(model_p_a=2.0))), r"t.jsonl:1.*model_p_a"),
    cli_case("import-task-rationale-huge", imp("t.jsonl", jl(vote(rationale="x" * 200_000))), r"t.jsonl:1.*rationale"),
    cli_case("import-task-choice-on-rank", imp("t.jsonl", jl({**RANK, "votes": [{"annotator": "imp", "choice": "A"}]})),
             r"t.jsonl:1"),
    cli_case("import-task-ranking-on-pair", imp("t.jsonl", jl(vote(choice="ranked", ranking=[[0], [1]]))),
             r"t.jsonl:1"),
    cli_case("import-task-three-on-a-pair", imp("t.jsonl", jl({**TASK, "responses": RANK["responses"]})),
             r"t.jsonl:1"),
    cli_case("import-task-overlap-0", imp("t.jsonl", jl({**TASK, "overlap": 0})), r"t.jsonl:1.*overlap"),
    cli_case("import-task-overlap-below-votes", imp("t.jsonl", jl({**TASK, "overlap": 1, "votes": [
        {"annotator": "x", "choice": "A"}, {"annotator": "y", "choice": "B"}]})), r"t.jsonl:1.*overlap"),
    cli_case("import-task-round-text", imp("t.jsonl", jl({**TASK, "round": "abc"})), r"t.jsonl:1.*round"),
    cli_case("import-task-same-annotator-twice", imp("t.jsonl", jl({**TASK, "overlap": 2, "votes": [
        {"annotator": "x", "choice": "A"}, {"annotator": "x", "choice": "B"}]})), r"t.jsonl:1"),
    cli_case("import-task-repeat-of-nothing", imp("t.jsonl", jl({**TASK, "repeat_of": 12345})), r"t.jsonl:1"),
    cli_case("import-task-empty-response", imp("t.jsonl", jl({**TASK, "responses": [{"text": "one"}, {"text": ""}]})),
             r"t.jsonl:1"),
    cli_case("import-task-responses-text", imp("t.jsonl", jl({**TASK, "responses": "one, two"})), r"t.jsonl:1"),
    cli_case("import-task-votes-not-a-list", imp("t.jsonl", jl({**TASK, "votes": {"annotator": "x"}})), r"t.jsonl:1"),
    cli_case("import-task-annotator-role-god", imp("t.jsonl", jl({"record": "annotator", "name": "z", "role": "god"})),
             r"t.jsonl:1.*role"),
    cli_case("import-task-unknown-record", imp("t.jsonl", jl({"record": "secret", "responses": []})), r"t.jsonl:1"),
    cli_case("import-task-bad-annotator-name", imp("t.jsonl", jl(vote(annotator="n" * 300))), r"t.jsonl:1"),
    cli_case("import-task-bad-after-good", imp("t.jsonl", jl(TASK, RANK, {**TASK, "prompt": "Other.", "kind": "duel"})),
             r"t.jsonl:3"),
    cli_case("import-task-created-at-garbage", imp("t.jsonl", jl({**TASK, "created_at": "yesterday"})), r"t.jsonl:1"),
    cli_case("import-forced-prompts-kind", imp("f.jsonl", jl({"chosen": "a", "rejected": "b"}), "--kind", "prompts"),
             r"f.jsonl:1"),
    cli_case("import-kind-bogus", imp("p.jsonl", jl({"prompt": "a"}), "--kind", "bogus"), "kind"),
    cli_case("import-on-bad-row-maybe", imp("p.jsonl", jl(PREF), "--on_bad_row", "maybe"), "on_bad_row"),
    cli_case("import-round-text", imp("p.jsonl", jl(PREF), "--round", "abc"), "--round"),
    cli_case("import-into-dead-postgres", lambda c: ["data", "import", "--db", DEAD_PG, "--file",
                                                    c.file("p.jsonl", jl({"prompt": "a"}))], "cannot open"),
]

EXPORT_CASES = [
    cli_case("export-unwritable-proc", lambda c: ["data", "export", "--db", c.db, "--out", "/proc/rlhf-export"],
             "/proc/rlhf-export"),
    cli_case("export-under-a-file", lambda c: ["data", "export", "--db", c.db, "--out",
                                               c.file("plain.txt", "x") + "/sub"], "plain.txt"),
    cli_case("export-format-csv", export("--format", "csv"), "format"),
    cli_case("export-two-margins", export("--margins", "1", "2"), "margins"),
    cli_case("export-margins-text", export("--margins", "a", "b", "c"), "--margins"),
    cli_case("export-test-size-1.5", export("--test_size", "1.5"), "test_size"),
    cli_case("export-aggregate-vote", export("--aggregate", "vote"), "aggregate"),
    cli_case("export-round-text", export("--round", "abc"), "--round"),
    cli_case("export-seed-list", export("--seed", "[1]"), "--seed"),
    cli_case("export-bad-db-url", lambda c: ["data", "export", "--db", "not a url", "--out", str(c.dir / "o")],
             "not a database URL"),
    cli_case("export-dead-postgres", lambda c: ["data", "export", "--db", DEAD_PG, "--out", str(c.dir / "o")],
             "cannot open"),
    cli_case("stats-round-text", lambda c: ["data", "stats", "--db", c.db, "--round", "x"], "--round"),
    cli_case("stats-json-maybe", lambda c: ["data", "stats", "--db", c.db, "--json", "maybe"], "--json"),
]

CONFIG_CASES = [
    cli_case("config-sample-n-text", with_config(["sample"], "n: abc\n"), r"bad.yaml: n: expected an integer"),
    cli_case("config-sample-prompt-text", with_config(["sample"], "prompt: hello\n"), r"prompt: expected a list"),
    cli_case("config-sample-temperature-list", with_config(["sample"], "temperature: [1]\n"), r"temperature: expected"),
    cli_case("config-sft-lora-maybe", with_config(["sft"], "lora: maybe\n"), r"lora: expected true or false"),
    cli_case("config-sft-lr-mapping", with_config(["sft"], "learning_rate: {a: 1}\n"), r"learning_rate: expected"),
    cli_case("config-generate-round-text", with_config(["generate"], "round: abc\n"), r"round: expected an integer"),
    cli_case("config-generate-n-float", with_config(["generate"], "n: 2.5\n"), r"n: expected an integer"),
    cli_case("config-generate-backend-number", with_config(["generate"], "backend: 3\n"), r"backend: expected one of"),
    cli_case("config-label-sim-tau-list", with_config(["label-sim"], "tau: [1]\n"), r"tau: expected a number"),
    cli_case("config-label-sim-annotator-list", with_config(["label-sim"], "annotator: [a, b]\n"),
             r"annotator: expected a string"),
    cli_case("config-label-port-mapping", with_config(["label"], "port: {a: 1}\n"), r"port: expected an integer"),
    cli_case("config-label-arena-text", with_config(["label"], "arena_models: base=x\n"),
             r"arena_models: expected a list"),
    cli_case("config-reward-batch-bool", with_config(["reward"], "batch_size: true\n"), r"batch_size: expected"),
    cli_case("config-dpo-beta-text", with_config(["dpo"], "beta: abc\n"), r"beta: expected a number"),
    cli_case("config-dpo-loss-unknown", with_config(["dpo"], "loss_type: nope\n"), r"loss_type: expected one of"),
    cli_case("config-ppo-steps-list", with_config(["ppo"], "steps: [1]\n"), r"steps: expected an integer"),
    cli_case("config-ppo-kl-k2", with_config(["ppo"], "kl_estimator: k2\n"), r"kl_estimator: expected one of"),
    cli_case("config-ppo-resume-bool", with_config(["ppo"], "resume: yes\n"), r"resume: expected a string"),
    cli_case("config-evaluate-aligned-text", with_config(["evaluate"], "aligned: runs/x\n"), r"aligned: expected a"),
    cli_case("config-evaluate-temperature-nan", with_config(["evaluate"], "temperature: .nan\n"), r"temperature: exp"),
    cli_case("config-loop-rounds-text", with_config(["loop"], "rounds: abc\n"), r"rounds: expected an integer"),
    cli_case("config-loop-ppo-steps-list", with_config(["loop"], "ppo:\n  steps: [1]\n"), r"ppo.steps: expected"),
    cli_case("config-loop-dpo-beta-text", with_config(["loop"], "dpo:\n  beta: abc\n"), r"dpo.beta: expected a number"),
    cli_case("config-loop-generate-n-text", with_config(["loop"], "generate:\n  n: x\n"), r"generate.n: expected"),
    cli_case("config-loop-evaluate-limit-bool", with_config(["loop"], "evaluate:\n  limit: true\n"),
             r"evaluate.limit: expected an integer"),
    cli_case("config-loop-label-sim-tau-map", with_config(["loop"], "label_sim:\n  tau: {a: 1}\n"), r"label_sim.tau"),
    cli_case("config-loop-export-margins-number", with_config(["loop"], "export:\n  margins: 1\n"),
             r"export.margins: expected a list"),
    cli_case("config-loop-reward-lora-maybe", with_config(["loop"], "reward:\n  lora: maybe\n"), r"reward.lora"),
    cli_case("config-loop-section-a-number", with_config(["loop"], "ppo: 3\n"), r"ppo: expected a mapping"),
    cli_case("config-loop-section-fixed-key", with_config(["loop"], "ppo:\n  output_dir: x\n"), r"set by LoopConfig"),
    cli_case("config-loop-section-unknown-key", with_config(["loop"], "ppo:\n  learning_rat: 1\n"), r"learning_rat"),
    cli_case("config-demo-rounds-text", with_config(["demo"], "rounds: abc\n"), r"rounds: expected an integer"),
    cli_case("config-export-round-text", with_config(["data", "export"], "round: abc\n"), r"round: expected an integ"),
    cli_case("config-import-kind-list", with_config(["data", "import"], "kind: [a]\n"), r"kind: expected a string"),
    cli_case("config-stats-json-maybe", with_config(["data", "stats"], "json: maybe\n"), r"json: expected true"),
    cli_case("config-not-yaml", with_config(["sample"], "n: [1, 2\n"), r"not valid YAML"),
    cli_case("config-a-list", with_config(["sample"], "- n\n- 2\n"), r"expected a mapping"),
    cli_case("config-unknown-key", with_config(["sample"], "max_new_tokenz: 3\n"), r"unknown key.*max_new_tokenz"),
    cli_case("config-not-utf8", with_config(["sample"], b"system: caf\xe9\n"), r"not UTF-8"),
    cli_case("config-missing", lambda c: ["sample", "--config", str(c.dir / "nope.yaml")], r"config file not found"),
    cli_case("config-a-directory", lambda c: ["sample", "--config", str(c.dir)], r"config file not found"),
    cli_case("config-empty-value", with_config(["sample"], "n:\n"), r"n: expected an integer, got an empty value"),
    cli_case("config-cross-field", with_config(["ppo"], "batch_size: 6\nmini_batch_size: 4\n"), r"multiple"),
    cli_case("config-key-twice", with_config(["dpo"], "beta: 0.1\nbeta: 0.2\n"), r"'beta' is given twice"),
    cli_case("config-section-key-twice", with_config(["loop"], "ppo:\n  steps: 1\n  steps: 2\n"), r"'steps' is given"),
    cli_case("config-infinity", with_config(["dpo"], "learning_rate: .inf\n"), r"learning_rate: expected a number"),
    cli_case("config-huge-exponent", with_config(["dpo"], "learning_rate: 1e400\n"), r"learning_rate: expected"),
]

FLAG_CASES = [
    cli_case("flag-unknown-command", lambda c: ["nosuchcommand"], r"invalid choice: 'nosuchcommand'"),
    cli_case("flag-unknown-option", lambda c: ["sample", "--no-such-option", "1"], r"unrecognized arguments"),
    cli_case("flag-prefix-of-option", lambda c: ["ppo", "--learning", "1e-3"], r"unrecognized arguments: --learning"),
    cli_case("flag-section-prefix", lambda c: ["loop", "--ppo.learn", "1"], r"unrecognized arguments: --ppo.learn"),
    cli_case("flag-int-text", lambda c: ["sample", "--n", "abc"], r"--n: invalid int value: 'abc'"),
    cli_case("flag-float-text", lambda c: ["sample", "--temperature", "hot"], r"invalid float value: 'hot'"),
    cli_case("flag-bool-maybe", lambda c: ["dpo", "--lora", "maybe"], r"expected true or false, got 'maybe'"),
    cli_case("flag-literal-k2", lambda c: ["ppo", "--kl_estimator", "k2"], r"invalid choice: 'k2'"),
    cli_case("flag-section-int-text", lambda c: ["loop", "--ppo.steps", "x"], r"invalid int value: 'x'"),
    cli_case("flag-section-fixed", lambda c: ["loop", "--ppo.output_dir", "x"], r"unrecognized arguments"),
    cli_case("flag-loop-rounds-0", lambda c: ["loop", "--rounds", "0"], r"rounds must be >= 1"),
    cli_case("flag-loop-stage-check", lambda c: ["loop", "--generate.n", "1"], r"generate: n must be at least"),
    cli_case("flag-ppo-no-reward", lambda c: ["ppo", "--reward_model", "", "--reward_fn", ""], r"give a reward"),
    cli_case("flag-evaluate-nothing-aligned", lambda c: ["evaluate"], r"aligned"),
    cli_case("flag-demo-human", lambda c: ["demo", "--base_model", str(c.dir), "--labeler", "human"], r"simulated"),
    cli_case("flag-generate-rank-2", lambda c: ["generate", "--rank", "2"], r"rank"),
    cli_case("flag-sample-top-p-0", lambda c: ["sample", "--top_p", "0"], r"top_p"),
    cli_case("flag-sample-missing-model", lambda c: ["sample", "--model", str(c.dir), "--device", "cpu"],
             r"not a model directory"),
    cli_case("flag-generate-model-not-there", lambda c: [
        "generate", "--db", c.db, "--model", c.folder("empty-model"), "--device", "cpu",
        "--prompts", c.file("g.jsonl", jl({"prompt": "Brand new prompt."}))], r"not a model directory"),
    cli_case("flag-generate-prompts-missing", lambda c: ["generate", "--db", c.db, "--prompts", str(c.dir / "n.jsonl")],
             r"n.jsonl"),
    cli_case("flag-label-sim-failing-gold", lambda c: ["label-sim", "--db", c.db, "--annotator", "sim-new",
                                                       "--gold", "test_bad_input:failing_gold"], r"gold"),
    cli_case("flag-label-sim-unknown-gold", lambda c: ["label-sim", "--db", c.db, "--gold", "no_such_module:fn"],
             r"gold"),
    cli_case("flag-label-sim-a-person", lambda c: ["label-sim", "--db", c.db, "--annotator", "alice"], r"alice"),
    cli_case("flag-data-no-action", lambda c: ["data"], r"say which"),
    cli_case("flag-models-no-action", lambda c: ["models"], r"say which"),
    cli_case("flag-annotators-no-action", lambda c: ["annotators"], r"say which"),
    cli_case("flag-annotators-add-no-name", lambda c: ["annotators", "add"], r"required: name"),
    cli_case("annotators-add-existing", lambda c: ["annotators", "add", "alice", "--db", c.db], r"exists already"),
    cli_case("annotators-add-empty-name", lambda c: ["annotators", "add", "", "--db", c.db], r"name"),
    cli_case("annotators-add-long-name", lambda c: ["annotators", "add", "n" * 300, "--db", c.db], r"name"),
    cli_case("annotators-list-bad-url", lambda c: ["annotators", "list", "--db", "notaurl"], r"not a database URL"),
    cli_case("annotators-list-unopenable", lambda c: ["annotators", "list", "--db", "sqlite:////proc/nope/x.db"],
             r"cannot open"),
    cli_case("annotators-add-dead-postgres", lambda c: ["annotators", "add", "zed", "--db", DEAD_PG], r"cannot open"),
    cli_case("label-missing-guidelines", lambda c: ["label", "--db", c.db, "--guidelines", str(c.dir / "g.md")],
             r"g.md"),
    cli_case("label-host-not-here", lambda c: ["label", "--db", c.db, "--host", "192.0.2.1", "--port", "7999"],
             r"192.0.2.1"),
    cli_case("label-dead-postgres", lambda c: ["label", "--db", DEAD_PG, "--port", str(_free_port())],
             r"cannot open"),
    cli_case("label-bad-arena-entry", lambda c: ["label", "--db", c.db, "--arena_models", "no-equals-sign"], r"arena"),
    cli_case("label-port-0", lambda c: ["label", "--db", c.db, "--port", "0"], r"port"),
    cli_case("flag-dpo-output-unwritable", lambda c: ["dpo", "--output_dir", "/proc/rlhf-dpo"], r"/proc/rlhf-dpo"),
    cli_case("flag-evaluate-output-under-a-file", lambda c: [
        "evaluate", "--aligned", "x", "--output_dir", c.file("plain.txt", "x") + "/eval"], r"plain.txt"),
    cli_case("flag-loop-runs-dir-unwritable", lambda c: ["loop", "--runs_dir", "/proc/rlhf-runs"], r"/proc/rlhf-runs"),
    cli_case("flag-export-config-and-flag", lambda c: [
        "data", "export", "--db", c.db, "--config", c.file("e.yaml", "margins: [0, 1]\n"), "--seed", "3"], r"margins"),
]


def train(stage: str, name: str, content):
    """A training stage on a data file holding `content` (it reads the data before it loads a model)."""
    return lambda c: [stage, "--data", c.file(name, content), "--output_dir", str(c.dir / "out"), "--device", "cpu"]


# load_preference_dataset reads these through `datasets`: its errors must come out as one line, and its progress
# bars must stay off stderr.
TRAINING_DATA_CASES = [
    cli_case(f"train-{stage}-{name}", train(stage, name, content), expected)
    for stage in ("dpo", "reward")
    for name, content, expected in [
        ("bad.jsonl", '{"prompt": "a", "chosen": "b"\n', r"bad.jsonl:1"),
        ("latin1.jsonl", b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n', r"latin1.jsonl:1.*UTF-8"),
        ("holes.jsonl", jl(PREF, {"prompt": None, "chosen": "b", "rejected": "c"}), r"holes.jsonl"),
        ("cols.csv", "prompt,chosen\na,b\n", r"missing column.*rejected"),
        ("broken.parquet", b"PAR1 not parquet", r"broken.parquet"),
    ]
] + [
    cli_case("train-sft-bad-json", lambda c: ["sft", "--data", c.file("s.jsonl", '{"messages": [\n'),
                                              "--output_dir", str(c.dir / "out")], r"s.jsonl:1"),
    cli_case("train-sft-no-columns", lambda c: ["sft", "--data", c.file("s.csv", "a,b\n1,2\n"),
                                                "--output_dir", str(c.dir / "out")], r"s.csv:2"),
    cli_case("train-dpo-no-such-data", lambda c: ["dpo", "--data", str(c.dir / "none.jsonl")], r"not found"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the store API


def _store_case(id_: str, call, expected: str, item: int | None = None, owner: str = "DATA"):
    marks = [xfail(id_, item, owner)] if item else []
    return pytest.param(call, expected, id=id_, marks=marks)


ARENA_MESSAGES = [{"role": "user", "content": "A new arena prompt."}]
ANSWERS = [("one", "m1", {}), ("two", "m2", {})]

STORE_CASES = [
    _store_case("submit-choice-C", lambda s, i: s.submit("alice", i["pair"], "C"), r"choice"),
    _store_case("submit-strength-5", lambda s, i: s.submit("alice", i["pair"], "A", strength=5), r"strength"),
    _store_case("submit-strength-bool", lambda s, i: s.submit("alice", i["pair"], "A", strength=True), r"strength"),
    _store_case("submit-left-C", lambda s, i: s.submit("alice", i["pair"], "A", left="C"), r"left"),
    _store_case("submit-no-task", lambda s, i: s.submit("alice", 99999, "A"), r"99999"),
    _store_case("submit-no-annotator", lambda s, i: s.submit("nobody", i["pair"], "A"), r"nobody"),
    _store_case("submit-deactivated", lambda s, i: s.submit("carol", i["pair"], "A"), r"carol"),
    _store_case("submit-twice", lambda s, i: s.submit("alice", i["voted"], "A"), r"already"),
    _store_case("submit-full", lambda s, i: s.submit("alice", i["full"], "A"), r"all the votes"),
    _store_case("submit-on-a-ranking", lambda s, i: s.submit("alice", i["rank"], "A"), r"rank"),
    _store_case("submit-huge-rationale", lambda s, i: s.submit("alice", i["pair"], "A", rationale="x" * 200_000),
                r"rationale"),
    _store_case("submit-rationale-a-number", lambda s, i: s.submit("alice", i["pair"], "A", rationale=5), r"rationale"),
    _store_case("submit-seconds-text", lambda s, i: s.submit("alice", i["pair"], "A", seconds="abc"), r"seconds"),
    _store_case("submit-seconds-nan", lambda s, i: s.submit("alice", i["pair"], "A", seconds=float("nan")),
                r"seconds"),
    _store_case("submit-seconds-negative", lambda s, i: s.submit("alice", i["pair"], "A", seconds=-1), r"seconds"),
    _store_case("submit-long-guideline", lambda s, i: s.submit("alice", i["pair"], "A", guideline_version="v" * 999),
                r"guideline"),
    _store_case("ranking-on-a-pair", lambda s, i: s.submit_ranking("alice", i["pair"], [[0], [1]], shown=[0, 1]),
                r"pair"),
    _store_case("ranking-on-an-arena-task", lambda s, i: s.submit_ranking("alice", i["arena"], [[0], [1]],
                                                                          shown=[0, 1]), r"arena"),
    _store_case("ranking-one-of-three", lambda s, i: s.submit_ranking("alice", i["rank"], [[0]], shown=[0, 1, 2]),
                r"ranking"),
    _store_case("ranking-a-position-twice", lambda s, i: s.submit_ranking("alice", i["rank"], [[0], [0], [1]],
                                                                          shown=[0, 1, 2]), r"ranking"),
    _store_case("ranking-position-3-of-3", lambda s, i: s.submit_ranking("alice", i["rank"], [[0], [1], [3]],
                                                                         shown=[0, 1, 2]), r"ranking"),
    _store_case("ranking-text-positions", lambda s, i: s.submit_ranking("alice", i["rank"], [["a"], [1], [2]],
                                                                        shown=[0, 1, 2]), r"ranking"),
    _store_case("ranking-empty-group", lambda s, i: s.submit_ranking("alice", i["rank"], [[0], [], [1, 2]],
                                                                     shown=[0, 1, 2]), r"ranking"),
    _store_case("ranking-bad-shown", lambda s, i: s.submit_ranking("alice", i["rank"], [[0], [1], [2]],
                                                                   shown=[0, 0, 1]), r"shown"),
    _store_case("ranking-huge-rationale", lambda s, i: s.submit_ranking("alice", i["rank"], [[0], [1], [2]],
                                                                        shown=[0, 1, 2], rationale="x" * 200_000),
                r"rationale"),
    _store_case("ranking-no-task", lambda s, i: s.submit_ranking("alice", 99999, [[0], [1]], shown=[0, 1]), r"99999"),
    _store_case("ranking-twice", lambda s, i: s.submit_ranking("bob", i["rank"], [[0], [1], [2]], shown=[0, 1, 2]),
                r"already"),
    _store_case("prompts-empty-text", lambda s, i: s.add_prompts([""]), r"empty"),
    _store_case("prompts-bad-last", lambda s, i: s.add_prompts(["A fine new prompt.", "  "]), r"empty"),
    _store_case("prompts-a-number", lambda s, i: s.add_prompts([123]), r"prompt"),
    _store_case("prompts-message-without-content", lambda s, i: s.add_prompts([[{"role": "user"}]]), r"prompt"),
    _store_case("prompts-no-messages", lambda s, i: s.add_prompts([[]]), r"prompt"),
    _store_case("prompts-splits-mismatch", lambda s, i: s.add_prompts(["new a", "new b"], split=["train"]), r"split"),
    _store_case("responses-no-prompt", lambda s, i: s.add_responses(99999, ["text"]), r"99999"),
    _store_case("task-one-response", lambda s, i: s.add_task(i["r2"][:1]), r"a pair task takes two responses"),
    _store_case("task-same-response-twice", lambda s, i: s.add_task([i["r2"][0]] * 2), r"distinct"),
    _store_case("task-unknown-response", lambda s, i: s.add_task([i["r2"][0], 99999]), r"99999"),
    _store_case("task-two-prompts", lambda s, i: s.add_task([i["r1"][0], i["r2"][0]]), r"same prompt"),
    _store_case("task-overlap-0", lambda s, i: s.add_task(i["r2"], overlap=0), r"overlap"),
    _store_case("task-kind-bogus", lambda s, i: s.add_task(i["r2"], kind="duel"), r"kind"),
    _store_case("task-three-on-a-pair", lambda s, i: s.add_task(i["r1"], kind="pair"), r"two"),
    _store_case("task-repeat-of-nothing", lambda s, i: s.add_task(i["r2"], repeat_of=99999), r"99999"),
    _store_case("arena-three-answers", lambda s, i: s.add_arena_task(ARENA_MESSAGES, ANSWERS + [("3", "m3", {})]),
                r"two"),
    _store_case("arena-prompt-too-long", lambda s, i: s.add_arena_task([{"role": "user", "content": "x" * 100_000}],
                                                                       ANSWERS), r"at most"),
    _store_case("arena-empty-prompt", lambda s, i: s.add_arena_task([{"role": "user", "content": " "}], ANSWERS),
                r"text"),
    _store_case("annotator-empty-name", lambda s, i: s.add_annotator(""), r"name"),
    _store_case("annotator-existing", lambda s, i: s.add_annotator("alice"), r"exists already"),
    _store_case("annotator-role-god", lambda s, i: s.add_annotator("zed", role="god"), r"role"),
    _store_case("annotator-long-name", lambda s, i: s.add_annotator("n" * 300), r"name"),
    _store_case("reset-credential-nobody", lambda s, i: s.reset_credential("nobody"), r"nobody"),
    _store_case("set-active-nobody", lambda s, i: s.set_active("nobody", False), r"nobody"),
    _store_case("review-maybe", lambda s, i: s.review(i["vote"], "maybe"), r"kept or rejected"),
    _store_case("review-no-vote", lambda s, i: s.review(99999, "kept"), r"99999"),
    _store_case("verdict-no-vote", lambda s, i: s.set_model_verdict(99999, 0.5, queue=False), r"99999"),
    _store_case("verdict-nan", lambda s, i: s.set_model_verdict(i["vote"], float("nan"), queue=False), r"p_a"),
    _store_case("skip-nobody", lambda s, i: s.skip("nobody", i["pair"]), r"nobody"),
    _store_case("skip-no-task", lambda s, i: s.skip("alice", 99999), r"99999"),
    _store_case("undo-nobody", lambda s, i: s.undo_last("nobody"), r"nobody"),
    _store_case("next-task-nobody", lambda s, i: s.next_task("nobody"), r"nobody"),
    _store_case("repeat-task-nobody", lambda s, i: s.repeat_task("nobody"), r"nobody"),
    _store_case("import-bad-after-good", lambda s, i: __import__("rlhf.store").store.import_tasks(
        s, [TASK, {**TASK, "prompt": "Another.", "kind": "duel"}]), r"row 2"),
    _store_case("open-not-a-url", lambda s, i: type(s)("not a url"), r"not a database URL"),
    _store_case("open-unopenable", lambda s, i: type(s)("sqlite:////proc/nope/x.db"), r"cannot open"),
    _store_case("open-dead-postgres", lambda s, i: type(s)(DEAD_PG), r"cannot open"),
]
