"""Tiny copies of every benchmark of configs/eval/paper.yaml, in the layout each distributor
ships (LLaVA's playground/data/eval tree), made from the synthetic set's images."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
MMBENCH_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
                  "source", "l2-category", "comment", "split"]
# Stand-ins for the official evaluators' files the judged protocols read their prompts from.
MMBENCH_EVALUATOR = ("def build_option_str(option_list):\n  s = 'Options: \\n'\n  return s\n\n\n"
                     "def build_prompt(question, options, prediction):\n"
                     "  tmpl = ('Match. Q: {}\\n{}A: {}\\nYour output: ')\n  return tmpl\n")
# A judge prompt standing in for MM-Vet's few-shot one, inside an evaluator-like file.
MMVET_EVALUATOR = 'import os\n\nprompt = """Grade the prediction.\n\nQ | GT | P | C\n"""\n\n\n' \
                  'def main():\n  pass\n'


def _jsonl(path: str, records) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def _json(path: str, value) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f)


def _images(folder: str, names, sources) -> None:
  os.makedirs(folder, exist_ok=True)
  for i, name in enumerate(names):
    os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
    shutil.copy(sources[i % len(sources)], os.path.join(folder, name))


def _mmbench_tsv(path: str, sources, with_answers: bool) -> None:
  """Two questions and their circular copies: 4 options (4 rows), then 2 options (2 rows)."""
  with open(sources[0], "rb") as f:
    image = base64.b64encode(f.read()).decode()
  rows = []
  for k in range(4):
    opts = ["circle", "square", "triangle", "star"]
    opts = opts[k:] + opts[:k]
    rows.append([k * 1_000_000 + 1, "What shape is it?", "nan" if k % 2 else "Look closely.",
                 *opts, "ABCD"[(0 - k) % 4], "shape", image, "synthetic", "perception", "", "dev"])
  for k in range(2):
    opts = ["red", "blue"]
    opts = opts[k:] + opts[:k]
    rows.append([k * 1_000_000 + 2, "Which colour?", "", *opts, "", "", "AB"[(1 - k) % 2],
                 "colour", image, "synthetic", "perception", "", "dev"])
  header = list(MMBENCH_HEADER)
  if not with_answers:
    header.remove("answer")
    rows = [r[:7] + r[8:] for r in rows]
  with open(path, "w", encoding="utf-8", newline="") as f:
    csv.writer(f, delimiter="\t", lineterminator="\n").writerows([header, *rows])


def make_eval_tree(root: str, sources: list[str]) -> str:
  """Writes the tree under `root` and returns it. `sources`: image files to copy."""
  d = lambda *p: os.path.join(root, *p)
  # VQAv2 test-dev: two questions; the full test split has a third the server also expects.
  vqa = [{"question_id": 11 + i, "image": f"COCO_test2015_{i:012d}.png",
          "text": f"What is in the image {i}?\n{SHORT}", "category": "default"} for i in range(2)]
  _jsonl(d("vqav2", "llava_vqav2_mscoco_test-dev2015.jsonl"), vqa)
  _jsonl(d("vqav2", "llava_vqav2_mscoco_test2015.jsonl"),
         vqa + [{"question_id": 99, "image": "x.png", "text": "?"}])
  _images(d("vqav2", "test2015"), [q["image"] for q in vqa], sources)
  # GQA: LLaVA's question file, the official balanced questions under data/.
  gqa = [{"question_id": f"20{i}", "image": f"n{i}.png", "text": f"Is there a shape {i}?\n{SHORT}"}
         for i in range(3)]
  _jsonl(d("gqa", "llava_gqa_testdev_balanced.jsonl"), gqa)
  _images(d("gqa", "data", "images"), [q["image"] for q in gqa], sources)
  _json(d("gqa", "data", "testdev_balanced_questions.json"),
        {q["question_id"]: {"answer": "yes", "types": {"structural": "verify"}} for q in gqa})
  # VizWiz: question ids are the image names.
  viz = [{"question_id": f"VizWiz_test_{i:08d}.png", "image": f"VizWiz_test_{i:08d}.png",
          "text": f"What is this?\nWhen the provided information is insufficient, respond with "
                  f"'Unanswerable'.\n{SHORT}"} for i in range(2)]
  _jsonl(d("vizwiz", "llava_test.jsonl"), viz)
  _images(d("vizwiz", "test"), [q["image"] for q in viz], sources)
  # ScienceQA: one problem with an image, one without; no answer-format line in the file.
  sqa = [{"id": "7", "image": "7/image.png", "conversations": [
             {"from": "human", "value": "<image>\nQuestion: Which shape?\nOptions: (A) circle "
                                        "(B) square"}, {"from": "gpt", "value": "A"}]},
         {"id": "8", "conversations": [
             {"from": "human", "value": "Question: Which is a colour?\nOptions: (A) red (B) "
                                        "dog"}, {"from": "gpt", "value": "A"}]}]
  _json(d("scienceqa", "llava_test_CQM-A.json"), sqa)
  _images(d("scienceqa", "images", "test"), ["7/image.png"], sources)
  _json(d("scienceqa", "problems.json"),
        {"7": {"choices": ["circle", "square"], "answer": 0, "image": "image.png"},
         "8": {"choices": ["red", "dog"], "answer": 0, "image": None}})
  # TextVQA with OCR tokens.
  tvqa = [{"question_id": 300 + i, "image": f"t{i}.png",
           "text": f"what is written {i}?\nReference OCR token: abc\n{SHORT}"} for i in range(2)]
  _jsonl(d("textvqa", "llava_textvqa_val_v051_ocr.jsonl"), tvqa)
  _images(d("textvqa", "train_images"), [q["image"] for q in tvqa], sources)
  _json(d("textvqa", "TextVQA_0.5.1_val.json"), {"data": [
      {"question_id": q["question_id"], "image_id": q["image"][:-4],
       "question": f"what is written {i}?", "answers": ["abc"] * 10}
      for i, q in enumerate(tvqa)]})
  # POPE: questions per split; label files (JSON lines) under coco/.
  pope = [{"question_id": i + 1, "image": f"COCO_val2014_{i:012d}.png",
           "text": f"Is there a circle in the image?\n{SHORT}",
           "category": ("random", "adversarial")[i % 2]} for i in range(4)]
  _jsonl(d("pope", "llava_pope_test.jsonl"), pope)
  _images(d("pope", "val2014"), [q["image"] for q in pope], sources)
  for split in ("random", "adversarial"):
    _jsonl(d("pope", "coco", f"coco_pope_{split}.json"),
           [{"question_id": q["question_id"], "image": q["image"], "text": "?",
             "label": ("yes", "no")[q["question_id"] % 2]} for q in pope
            if q["category"] == split])
  # MME: one subtask, the image beside its question file.
  mme_dir = d("MME", "MME_Benchmark_release_version", "color")
  _images(mme_dir, ["000.png"], sources)
  with open(os.path.join(mme_dir, "000.txt"), "w") as f:
    f.write("Is there a red shape? Please answer yes or no.\tYes\n"
            "Is there a blue shape? Please answer yes or no.\tNo\n")
  _jsonl(d("MME", "llava_mme.jsonl"), [
      {"question_id": "color/000.png", "image": "color/000.png",
       "text": f"Is there a {c} shape?\n{SHORT}", "category": "color"} for c in ("red", "blue")])
  # MMBench dev (with answers) and test (without).
  os.makedirs(d("mmbench"), exist_ok=True)
  _mmbench_tsv(d("mmbench", "mmbench_dev_20230712.tsv"), sources, with_answers=True)
  _mmbench_tsv(d("mmbench", "mmbench_test_20230712.tsv"), sources, with_answers=False)
  with open(d("mmbench", "eval_mmbench.py"), "w") as f:
    f.write(MMBENCH_EVALUATOR)
  os.makedirs(d("mmbench_cn"), exist_ok=True)
  _mmbench_tsv(d("mmbench_cn", "mmbench_dev_cn_20231003.tsv"), sources, with_answers=True)
  # SEED-Bench: two image questions and one video-frame question (not scored).
  seed = [{"question_id": 101 + i, "image": img, "category": "Scene Understanding",
           "text": f"What is shown?\nA. a\nB. b\nC. c\nD. d\n{LETTER}"}
          for i, img in enumerate(["SEED-Bench-image/1_1.png", "SEED-Bench-image/1_2.png",
                                   "SEED-Bench-video-image/v_1.png"])]
  _jsonl(d("seed_bench", "llava-seed-bench.jsonl"), seed)
  _images(d("seed_bench"), [q["image"] for q in seed], sources)
  _json(d("seed_bench", "SEED-Bench.json"), {
      "question_type": {"Scene Understanding": 1, "Instance Identity": 2, "Action": 10},
      "questions": [
          {"question_id": "101", "answer": "A", "data_type": "image", "question_type_id": 1},
          {"question_id": "102", "answer": "B", "data_type": "image", "question_type_id": 2},
          {"question_id": "103", "answer": "C", "data_type": "video", "question_type_id": 10}]})
  # LLaVA-Bench in-the-wild, with a stand-in for LLaVA's rule.json.
  bench = [{"question_id": i, "image": f"00{i}.png", "text": f"Describe picture {i}.",
            "category": ("conv", "detail")[i]} for i in range(2)]
  _jsonl(d("llava-bench-in-the-wild", "questions.jsonl"), bench)
  _jsonl(d("llava-bench-in-the-wild", "context.jsonl"),
         [{"id": i, "image": q["image"], "caption": f"Caption {i}."} for i, q in enumerate(bench)])
  _jsonl(d("llava-bench-in-the-wild", "answers_gpt4.jsonl"),
         [{"question_id": q["question_id"], "answer_id": f"gpt4-{i}", "text": f"Reference {i}."}
          for i, q in enumerate(bench)])
  _json(d("llava-bench-in-the-wild", "rule.json"),
        {f"llava_bench_{c}": {"role": "Assistant", "prompt": f"Rate the {c} answers."}
         for c in ("conv", "detail", "complex")})
  _images(d("llava-bench-in-the-wild", "images"), [q["image"] for q in bench], sources)
  # MM-Vet: LLaVA's question file, the official samples, an evaluator file with `prompt`.
  mmvet = [{"question_id": i, "image": f"v1_{i}.png", "text": f"How many shapes {i}?"}
           for i in range(3)]
  _jsonl(d("mm-vet", "llava-mm-vet.jsonl"), mmvet)
  _images(d("mm-vet", "images"), [q["image"] for q in mmvet], sources)
  _json(d("mm-vet", "mm-vet.json"), {
      "v1_0": {"question": "How many shapes 0?", "answer": "2<OR>two", "capability": ["rec"]},
      "v1_1": {"question": "How many shapes 1?", "answer": "3", "capability": ["rec", "ocr"]},
      "v1_2": {"question": "How many shapes 2?", "answer": "1<AND>one",
               "capability": ["ocr", "math"]}})
  with open(d("mm-vet", "mm-vet_evaluator.py"), "w") as f:
    f.write(MMVET_EVALUATOR)
  return root


class JudgeServer:
  """An OpenAI-compatible chat endpoint on 127.0.0.1 for the tests; `reply(body)` gives
  (status, content) for each request body, and every request body is kept in `requests`.

      with JudgeServer(reply) as server:
        JudgeConfig(base_url=server.url, model="judge")
  """

  def __init__(self, reply):
    import http.server  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    outer = self
    self.requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                               **body})
        status, content = reply(body)
        if status == 200:
          payload = {"model": body["model"] + "-served",
                     "choices": [{"message": {"role": "assistant", "content": content}}]}
        else:
          payload = {"error": {"message": content}}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 429:
          self.send_header("Retry-After", "0.5")
        self.end_headers()
        self.wfile.write(data)

      def log_message(self, *args):
        pass

    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._server.shutdown()
    self._server.server_close()


def judge_reply(body) -> tuple[int, str]:
  """The tests' judge: MMBench matches every answer to "A"; LLaVA-Bench reviews score by
  category (conv "8 6", detail "5,10");
  MM-Vet grades by the question: "0.5", one unreadable reply then "0.3" on the retry,
  "1.0"."""
  content = body["messages"][-1]["content"]
  if content.endswith("Your output: "):  # MMBench's option matching
    return 200, "A"
  if "[System]" in content:
    return 200, ("8 6\nThe second is shorter." if "conv answers" in content else
                 "5,10\nThe second is better.")
  if "How many shapes 1?" in content:
    return 200, ("0.3" if "Predict the correctness" in content else "great answer")
  if "How many shapes 2?" in content:
    return 200, "1.0"
  return 200, "0.5 because"
