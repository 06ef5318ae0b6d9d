"""A stand-in tokenizer for the API tests (test_openai_convert.py, test_openai_app.py,
test_grpc_bad_input_status.py): one token per character (ord % VOCAB), a chat template that joins roles."""

VOCAB = 1000


class CharTok:
    added_tokens_decoder: dict = {}

    def encode(self, text, add_special_tokens=False, **kw):
        return [ord(c) % VOCAB for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def get_vocab(self):
        return {"a": 0}

    def convert_tokens_to_string(self, toks):
        return "a"

    def apply_chat_template(self, msgs, add_generation_prompt=True, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}" for m in msgs) + "<assistant>"
