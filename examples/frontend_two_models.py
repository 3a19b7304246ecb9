"""An SGLang frontend program that runs two decode models over one context.

``pfs_sglang.frontend.PrefillShareBackend`` gives one stock ``RuntimeEndpoint`` per
decode model of the router, and ``pfs.use(s, model)`` sends a program state's next
calls to that model. The program writes a record once, forks the state in two and
asks ``extract``, then ``compute``, its own question about it, one per fork. The
prefill module computes the context's KV for the ``extract`` call and ``compute``
reads it from the same prefix tree: its ``cached_tokens`` cover the whole context,
although ``compute`` never saw it before.

    python -m pfs_sglang.launch_server            # the demo deployment, in another shell
    python examples/frontend_two_models.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
from urllib.error import URLError

import sglang as sgl

from pfs_sglang.frontend import PrefillShareBackend

RECORD = "name: bob; city: rome; color: red; qty: 4; price: 2; size: 7"
QUESTIONS = {"extract": "What is the city?", "compute": "What is qty plus price?"}
# The demo models' chat format (their tokenizer's chat template): a user turn holding
# the record and the question, then the assistant's answer up to <|end|>.
CONTEXT = f"<|bos|><|user|>\n{RECORD}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000", help="the router's base URL")
    args = parser.parse_args()
    pfs = PrefillShareBackend(args.url)

    @sgl.function
    def two_models(s, context: str):
        s += context
        answers = []
        for fork, (model, question) in zip(s.fork(len(QUESTIONS)), QUESTIONS.items()):
            pfs.use(fork, model)  # this fork's calls go to `model`
            fork += question + "<|end|>\n<|assistant|>\n"
            fork += sgl.gen("answer", max_tokens=8, temperature=0, stop="<|end|>")
            answers.append((fork["answer"], fork.get_meta_info("answer")))  # waits: one model after the other
        return answers

    try:
        backend = pfs.endpoint("extract")  # reads the model's /get_model_info through the router
    except URLError as error:
        raise SystemExit(f"cannot reach the router at {args.url} ({error.reason}); start one with: "
                         "python -m pfs_sglang.launch_server")
    state = two_models.run(context=CONTEXT, backend=backend)
    if state.error():
        raise SystemExit(f"the program failed: {state.error()}")
    print(f"shared context: {CONTEXT!r}")
    for (model, question), (answer, meta) in zip(QUESTIONS.items(), state.ret_value):
        print(f"[{model}] {question} -> {answer!r}: prompt_tokens {meta['prompt_tokens']}, "
              f"cached_tokens {meta['cached_tokens']}")


if __name__ == "__main__":
    main()
