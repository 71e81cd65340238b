"""The judge against a local OpenAI-compatible server (127.0.0.1): retries with back-off,
the on-disk cache, errors; LLaVA-Bench and MM-Vet judged and aggregated as their official
scripts do."""

import json

import pytest

from sqllava_jax.evaluation import llava_bench, mmvet
from sqllava_jax.evaluation.judge import Judge, JudgeConfig, JudgeError
from tests.eval_suite_data import JudgeServer

MESSAGES = [{"role": "user", "content": "grade this"}]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
  monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")


def _judge(server, tmp_path, sleeps=None, **kw):
  config = JudgeConfig(base_url=server.url, model="judge-1", api_key_env="TEST_JUDGE_KEY",
                       backoff_s=0.25, **kw)
  return Judge(config, str(tmp_path / "cache.jsonl"),
               sleep=(sleeps.append if sleeps is not None else lambda s: None))


def test_retries_with_backoff_then_caches_on_disk(tmp_path):
  failures = iter([(503, "overloaded"), (429, "slow down"), (500, "oops")])
  with JudgeServer(lambda body: next(failures, (200, "7 9"))) as server:
    sleeps = []
    judge = _judge(server, tmp_path, sleeps)
    reply = judge.chat(MESSAGES, temperature=0.0, max_tokens=3)
    assert (reply.content, reply.model, reply.cached) == ("7 9", "judge-1-served", False)
    # doubling back-off from 0.25 s; the 429's Retry-After (0.5 s) replaces its wait
    assert sleeps == [0.25, 0.5, 1.0]
    assert len(server.requests) == 4
    sent = server.requests[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer sk-test"
    assert (sent["model"], sent["messages"], sent["temperature"], sent["max_tokens"]) == (
        "judge-1", MESSAGES, 0.0, 3)
    # the same request again, in this judge or a new one reading the cache: nothing sent
    assert judge.chat(MESSAGES, temperature=0.0, max_tokens=3).cached
    again = _judge(server, tmp_path)
    assert again.chat(MESSAGES, temperature=0.0, max_tokens=3).content == "7 9"
    assert len(server.requests) == 4
    # another temperature is another request
    again.chat(MESSAGES, temperature=0.5, max_tokens=3)
    assert len(server.requests) == 5


def test_a_cut_cache_line_is_asked_again(tmp_path):
  with JudgeServer(lambda body: (200, "1.0")) as server:
    _judge(server, tmp_path).chat(MESSAGES, temperature=0.0, max_tokens=3)
    with open(tmp_path / "cache.jsonl", "a") as f:
      f.write('{"key": "abc", "cont')  # a kill mid-write
    judge = _judge(server, tmp_path)
    judge.chat(MESSAGES, temperature=0.0, max_tokens=3)
    assert len(server.requests) == 1


def test_errors_say_what_failed(tmp_path, monkeypatch):
  with JudgeServer(lambda body: (401, "bad key")) as server:
    with pytest.raises(JudgeError, match="HTTP 401.*bad key"):
      _judge(server, tmp_path).chat(MESSAGES, temperature=0.0, max_tokens=3)
    assert len(server.requests) == 1  # not retried
  with JudgeServer(lambda body: (503, "down")) as server:
    with pytest.raises(JudgeError, match="failed 3 times; last: HTTP 503"):
      _judge(server, tmp_path, max_attempts=3).chat(MESSAGES, temperature=0.0, max_tokens=3)
  monkeypatch.delenv("TEST_JUDGE_KEY")
  with pytest.raises(ValueError, match=r"\$TEST_JUDGE_KEY, which is not set"):
    Judge(JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m",
                      api_key_env="TEST_JUDGE_KEY"), str(tmp_path / "c.jsonl"))


def test_llava_bench_review_and_relative_score(tmp_path):
  questions = [{"question_id": i, "image": f"{i}.jpg", "text": f"q{i}", "category": c}
               for i, c in enumerate(["conv", "conv", "detail"])]
  contexts = [{"image": f"{i}.jpg", "caption": ["line one", "line two"] if i == 0 else "cap"}
              for i in range(3)]
  refs = [{"question_id": i, "answer_id": f"r{i}", "text": f"ref {i}"} for i in range(3)]
  ours = [{"question_id": i, "text": f"ours {i}"} for i in range(3)]
  rules = {"llava_bench_conv": {"role": "Assistant", "prompt": "Rate conv."},
           "llava_bench_detail": {"role": "Assistant", "prompt": "Rate detail."}}
  # "7, 7" becomes "7  7": three pieces on single spaces, so the reference reads no scores
  replies = iter(["8 6\nok", "7,7\nok", "7, 7\nok"])
  with JudgeServer(lambda body: (200, next(replies))) as server:
    judge = _judge(server, tmp_path)
    protocol = llava_bench.Protocol(system="Be precise.", temperature=0.2, max_tokens=1024)
    reviews = llava_bench.review(judge, protocol, questions, contexts, refs, ours, rules)
    first = server.requests[0]
  assert first["messages"][0] == {"role": "system", "content": "Be precise."}
  assert (first["temperature"], first["max_tokens"]) == (0.2, 1024)
  # eval_gpt_review_bench.py's layout, the caption's lines joined
  assert first["messages"][1]["content"] == (
      "[Context]\nline one\nline two\n\n[Question]\nq0\n\n[Assistant 1]\nref 0\n\n"
      "[End of Assistant 1]\n\n[Assistant 2]\nours 0\n\n[End of Assistant 2]\n\n"
      "[System]\nRate conv.\n\n")
  assert [r["tuple"] for r in reviews] == [[8.0, 6.0], [7.0, 7.0], [-1.0, -1.0]]
  assert reviews[0]["answer1_id"] == "r0" and reviews[0]["category"] == "llava_bench_conv"
  summary = llava_bench.summarize(reviews)
  # summarize_gpt_review.py: means rounded to 3 decimals, then 100 * ours / reference;
  # the unparsed (-1, -1) review is averaged in. all: (14/3, 12/3) -> 4.667, 4.0
  assert summary["relative_score"] == round(4.0 / 4.667 * 100, 1) == 85.7
  assert summary["per_category"]["conv"] == {"relative": 86.7, "reference": 75.0, "ours": 65.0}
  assert summary["per_category"]["detail"]["relative"] == 100.0
  assert summary["unparsed_reviews"] == 1


def test_llava_bench_pairs_answers_line_by_line():
  q = [{"question_id": 1, "image": "a", "text": "t", "category": "conv"}]
  with pytest.raises(ValueError, match="answer 0 is for question 2"):
    llava_bench.review(None, None, q, [], [{"question_id": 1, "text": "r"}],
                       [{"question_id": 2, "text": "x"}], {})


def test_mmvet_grades_with_the_evaluators_retries_and_scores_per_capability(tmp_path):
  samples = {"v1_0": {"question": "Q0", "answer": "2<OR>two", "capability": ["rec"]},
             "v1_1": {"question": "Q1", "answer": "a<AND>b", "capability": ["rec", "ocr"]},
             "v1_2": {"question": "Q2", "answer": "x", "capability": ["ocr", "math"]},
             "v1_3": {"question": "Q3", "answer": "y", "capability": ["math"]}}
  answers = [{"question_id": i, "text": f"pred {i}"} for i in range(3)]  # v1_3 unanswered

  def reply(body):
    content = body["messages"][0]["content"]
    if "Q0 |" in content:
      return 200, "0.5"
    if "Q1 |" in content:  # unreadable twice, then a grade
      return 200, ("0.8" if body["temperature"] == 0.5 else "good")
    return 200, "1.5"  # out of range every time -> 0.0 after five replies
  prompt = mmvet.read_prompt(_evaluator(tmp_path))
  assert prompt == "Grade.\nQ | GT | P | C\n"
  protocol = mmvet.Protocol(retry_suffix="\nDigit: ", temperature=0.0, temperature_step=0.5,
                            max_tokens=3, max_replies=5)
  with JudgeServer(reply) as server:
    grades = mmvet.grade_all(_judge(server, tmp_path), protocol, prompt, samples, answers)
    sent = server.requests
  first = sent[0]["messages"][0]["content"]
  assert first == "Grade.\nQ | GT | P | C\n\nQ0 | 2 <OR> two | pred 0 | "
  q1 = [r for r in sent if "Q1 |" in r["messages"][0]["content"]]
  # first ask at 0.0, then the retry text at 0.0, 0.5 (readable there)
  assert [r["temperature"] for r in q1] == [0.0, 0.0, 0.5]
  assert q1[1]["messages"][0]["content"].endswith("a <AND> b | pred 1 | \nDigit: ")
  q2 = [r for r in sent if "Q2 |" in r["messages"][0]["content"]]
  assert [r["temperature"] for r in q2] == [0.0, 0.0, 0.5, 1.0, 1.5]
  assert {k: g["score"] for k, g in grades.items()} == {"v1_0": [0.5], "v1_1": [0.8],
                                                          "v1_2": [0.0]}
  scores = mmvet.capability_scores(grades, samples)
  # per capability: sum of its samples' grades / their number x 100; the unanswered counts 0
  assert scores["per_capability"] == {"rec": 65.0, "ocr": 40.0, "math": 0.0}
  assert scores["total"] == round((0.5 + 0.8) / 4 * 100, 1) == 32.5
  assert scores["per_integration"]["ocr_rec"] == 80.0
  assert scores["num_graded"] == 3


def _evaluator(tmp_path):
  path = tmp_path / "mm-vet_evaluator.py"
  path.write_text('import json\nprompt = """Grade.\nQ | GT | P | C\n"""\nx = 1\n')
  return str(path)


def test_mmvet_submission_layout(tmp_path):
  out = mmvet.write_submission(str(tmp_path / "r.json"), [{"question_id": 3, "text": "four"}])
  assert json.loads(open(out).read()) == {"v1_3": "four"}
