"""`scorer: judge` against a real HTTP server on 127.0.0.1 that answers /v1/chat/completions as an
OpenAI-compatible endpoint does: grades read, the key sent from the variable params name, failures
counted (never a 0), grades cached so a rerun asks nothing again, and a judged score paired like any."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from conftest import ROOT

from tuneoff.core.errors import TuneoffError
from tuneoff.core.params import EvaluateParams, section
from tuneoff.decision.pairs import one_pair
from tuneoff.evaluation.judge import grade_all
from tuneoff.evaluation import score as scoring

SEEN = []  # (authorization header, request body) of every request the server answered


class Judge(BaseHTTPRequestHandler):
    """Grades 5 for a reply equal to a reference, 3 for one sharing a word with one, else 1; a reply
    "confuse" gets an answer with no grade, "crash" a 500."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        SEEN.append((self.headers.get("Authorization"), body))
        asked = body["messages"][-1]["content"]
        refs = [line[2:] for line in asked.split("Reference answers:\n")[1].split("\n\n")[0].splitlines()]
        reply = asked.split("Reply to grade:\n")[1]
        if self.path != "/v1/chat/completions" or reply == "crash":
            self.send_response(500)
            self.end_headers()
            return
        words = set(re.findall(r"\w+", " ".join(refs).lower()))
        grade = 5 if reply in refs else 3 if words & set(re.findall(r"\w+", reply.lower())) else 1
        text = "I cannot tell." if reply == "confuse" else f"Grade: {grade}"
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}],
                          "usage": {"prompt_tokens": 40, "completion_tokens": 3}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


@pytest.fixture
def params(server, tmp_path, monkeypatch):
    """evaluate from params.yaml, its judge pointed at the local server, the key in the variable it names."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["evaluate"]["judge"].update(url=server, api_key_env="TUNEOFF_TEST_JUDGE_KEY", cache_dir=str(tmp_path / "cache"))
    monkeypatch.setenv("TUNEOFF_TEST_JUDGE_KEY", "sk-test")
    return section(EvaluateParams, "evaluate", data=data)


PROMPTS = ["Where is Aromi?", "What does Cotto serve?", "Is Zizzi cheap?", "Describe Strada.", "Describe Wildwood."]
REFERENCES = [["Aromi is by the river.", "Aromi is in the riverside area."], ["Cotto serves Italian food."],
              ["Zizzi is cheap."], ["Strada is a pub."], ["Wildwood is a restaurant."]]


def test_grades_come_from_the_server_failures_are_counted_and_a_rerun_asks_nothing(params):
    SEEN.clear()
    replies = ["Aromi is by the river.", "pasta, mostly", "crash", "confuse", "Wildwood: a restaurant"]
    rows, usage = grade_all(params.judge, PROMPTS, REFERENCES, replies)
    assert [r["grade"] for r in rows] == [5, 1, None, None, 3]
    assert [r["score"] for r in rows] == [1.0, 0.0, None, None, 0.5]  # grades 1-5 mapped to [0, 1]
    assert "judge_error" in rows[2] and "HTTPError" in rows[2]["judge_error"] and rows[3]["judge_reply"] == "I cannot tell."
    assert usage == {"requests": 5, "cached": 0, "input_tokens": 160, "output_tokens": 12, "ungraded": 2}
    auth, body = next(seen for seen in SEEN if "Aromi" in seen[1]["messages"][1]["content"])  # sent 8 at a time
    assert {a for a, _ in SEEN} == {"Bearer sk-test"}
    assert auth == "Bearer sk-test" and body["model"] == params.judge.model and body["temperature"] == 0
    assert "from 1 to 5" in body["messages"][0]["content"] and "- Aromi is in the riverside area." in body["messages"][1]["content"]
    # the rerun reads every grade it has from the cache and asks again only for the two that failed
    SEEN.clear()
    again, usage = grade_all(params.judge, PROMPTS, REFERENCES, replies)
    assert [r["grade"] for r in again] == [5, 1, None, None, 3] and len(SEEN) == 2
    assert usage["requests"] == 2 and usage["cached"] == 3 and usage["ungraded"] == 2


def test_a_judged_task_is_scored_and_paired_like_any_score(params):
    test = scoring.TestSet("judge", [], [[{"role": "user", "content": p}] for p in PROMPTS], [r[0] for r in REFERENCES],
                   REFERENCES)
    metrics, rows = scoring.score_replies(test, ["Aromi is by the river.", "Cotto", "crash", "Strada is a pub.", "Wildwood"], params)
    assert metrics["main_metric"] == "judge_grade" and metrics["ungraded"] == 1
    assert metrics["main"] == pytest.approx((1.0 + 0.5 + 0.5 + 1.0) / 4)  # over the graded items
    assert metrics["judge"]["requests"] == 5 and metrics["exact_match"] == 0.4
    base = [{"expected": r[0], "correct": False, "score": 0.0, "loss": None} for r in REFERENCES]
    tuned = [{"expected": r[0], **row, "loss": None} for r, row in zip(REFERENCES, rows)]
    pair = one_pair("full", "base", {"full": tuned, "base": base}, 100, 0)
    assert pair["n"] == 4 and pair["ungraded"] == 1 and pair["diff_points"] == 75.0 and pair["sd_points"] > 0


def test_a_missing_key_is_one_line_naming_the_variable(params, monkeypatch):
    monkeypatch.delenv("TUNEOFF_TEST_JUDGE_KEY")
    with pytest.raises(TuneoffError, match="evaluate.judge.api_key_env: the environment variable TUNEOFF_TEST_JUDGE_KEY "
                                           "is not set"):
        grade_all(params.judge, PROMPTS, REFERENCES, ["x"] * 5)


def test_the_report_counts_what_the_judge_was_asked_and_what_it_cost():
    from tuneoff.decision.report import _free_form_table

    asked = {"requests": 300, "cached": 100, "input_tokens": 120_000, "output_tokens": 1_200, "ungraded": 3}
    c = {"scorer": "judge", "rows": [{"method": "full", "metrics": {"judge_grade": 0.62, "exact_match": 0.1, "ungraded": 3,
                                                                    "judge": asked}, "judge_usd": 0.01872}]}
    table = "\n".join(_free_form_table(c))
    assert "| method | judge_grade | exact_match | ungraded | judge requests | judge tokens in / out | judge USD |" in table
    assert "| full | 62.0 | 10.0 | 3 | 300 (100 cached) | 120,000 / 1,200 | 0.0187 |" in table
