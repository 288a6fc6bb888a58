"""`scorer: judge`: an LLM grades each reply, for replies no reference captures word for word (support
answers, chat). Any OpenAI-compatible chat endpoint (`evaluate.judge.url` + /chat/completions) gets the
rubric (system), then the prompt, every reference and the reply (user), and answers with a whole-number
grade on the rubric's scale, mapped to [0, 1] and paired like any score (tuneoff/decision/stats.py).

Each grade is kept in `evaluate.judge.cache_dir`, one file per (judge model, rubric, scale, prompt,
references, reply), so a rerun asks nothing again for a reply it has graded; the records in
predictions.jsonl hold each grade and the judge's own words. A request that fails or an answer with no
grade on the scale leaves the item ungraded: counted, shown, and left out of the pairs, never a 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tuneoff.core.atomic import write_json
from tuneoff.core.errors import TuneoffError
from tuneoff.core.params import JudgeParams

GRADE = re.compile(r"-?\d+(?:\.\d+)?")


def api_key(params: JudgeParams) -> str | None:
    """The key from the environment variable params names; None when it names none (a local server)."""
    if not params.api_key_env:
        return None
    key = os.environ.get(params.api_key_env)
    if not key:
        raise TuneoffError(f"evaluate.judge.api_key_env: the environment variable {params.api_key_env} is not set "
                           "(the judge's API key)")
    return key


def question(prompt: str, references: list[str], reply: str) -> str:
    refs = "\n".join(f"- {r}" for r in references)
    return f"Prompt:\n{prompt}\n\nReference answers:\n{refs}\n\nReply to grade:\n{reply}"


def cache_key(params: JudgeParams, prompt: str, references: list[str], reply: str) -> str:
    what = [params.model, params.rubric, params.lowest, params.highest, prompt, references, reply]
    return hashlib.sha256(json.dumps(what, ensure_ascii=False).encode()).hexdigest()


def parse(text: str, params: JudgeParams) -> int | None:
    """The first number in the judge's answer, if it is a whole grade on the scale."""
    found = GRADE.search(text or "")
    if not found or float(found.group()) != int(float(found.group())):
        return None
    grade = int(float(found.group()))
    return grade if params.lowest <= grade <= params.highest else None


def ask(params: JudgeParams, key: str | None, prompt: str, references: list[str], reply: str) -> dict:
    """One grade: {"grade", "judge_reply", "input_tokens", "output_tokens"} or {"judge_error"}."""
    body = {"model": params.model, "max_tokens": params.max_tokens, "temperature": 0,
            "messages": [{"role": "system", "content": params.rubric.format(lowest=params.lowest, highest=params.highest)},
                         {"role": "user", "content": question(prompt, references, reply)}]}
    request = urllib.request.Request(params.url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=params.timeout_seconds) as response:
            answer = json.loads(response.read())
        text = answer["choices"][0]["message"]["content"]
    except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        return {"judge_error": f"{type(e).__name__}: {e}"[:300]}
    usage = answer.get("usage") or {}
    grade = parse(text, params)
    out = {"judge_reply": text, "input_tokens": usage.get("prompt_tokens", 0),
           "output_tokens": usage.get("completion_tokens", 0)}
    if grade is None:
        return {**out, "judge_error": f"no grade from {params.lowest} to {params.highest} in the answer"}
    return {**out, "grade": grade}


def grade_all(params: JudgeParams, prompts: list[str], references: list[list[str]], replies: list[str]) -> tuple[list[dict], dict]:
    """Per item {"correct", "score" (in [0, 1], None when ungraded), "grade", "judge_reply"[, "judge_error"]} and
    what the judge was asked: requests sent, answers read from the cache, ungraded items and tokens."""
    key = api_key(params)
    cache = Path(params.cache_dir)
    keys = [cache_key(params, p, r, a) for p, r, a in zip(prompts, references, replies)]
    found = {k: json.loads((cache / k[:2] / f"{k}.json").read_text()) for k in set(keys)
             if (cache / k[:2] / f"{k}.json").is_file()}
    todo = sorted({k: i for i, k in enumerate(keys) if k not in found}.items(), key=lambda kv: kv[1])
    with ThreadPoolExecutor(params.concurrency) as pool:
        answers = list(pool.map(lambda kv: ask(params, key, prompts[kv[1]], references[kv[1]], replies[kv[1]]), todo))
    usage = {"requests": len(todo), "cached": len(keys) - sum(k not in found for k in keys), "input_tokens": 0,
             "output_tokens": 0}
    for (k, _), answer in zip(todo, answers):
        usage["input_tokens"] += answer.get("input_tokens", 0)
        usage["output_tokens"] += answer.get("output_tokens", 0)
        if "grade" in answer:  # a failure is asked again next time
            write_json(cache / k[:2] / f"{k}.json", answer)
        found[k] = answer
    rows = []
    for k, reply, refs in zip(keys, replies, references):
        a = found[k]
        grade = a.get("grade")
        rows.append({"correct": reply.strip() in [r.strip() for r in refs], "grade": grade,
                     "score": None if grade is None else (grade - params.lowest) / (params.highest - params.lowest),
                     "judge_reply": a.get("judge_reply"), **({"judge_error": a["judge_error"]} if "judge_error" in a else {})})
    usage["ungraded"] = sum(r["score"] is None for r in rows)
    return rows, usage
