"""`sparsex serve` over the embedded SmolLM2-135M (its tokenizer and chat template): the openai
client's chat completion, streaming and not, gives Engine.generate's tokens, and a second turn
reuses the first."""

import openai
import pytest

import sparsex_jax as sx
from sparsex_jax.entrypoints.serve.app import ServeConfig
from tests.entrypoints.test_serve import serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(real_model):
  engine = sx.Engine(real_model.config, real_model.params, real_model.tokenizer, page_size=16,
                     num_pages=256, max_batch_size=2)
  yield from serving(engine, ServeConfig("smollm2-135m", sx.ReuseConfig("sparsex")))


def test_real_model_chat_matches_engine_generate_and_reuses_the_first_turn(server, real_model):
  client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
  turn1 = [{"role": "user", "content": "The Orvane Bridge was designed by Hedda Lindqvist. "
                                       "Who designed the Orvane Bridge?"}]
  ref = sx.Engine(real_model.config, real_model.params, real_model.tokenizer, page_size=16,
                  num_pages=256)
  sp = sx.SamplingParams(max_new_tokens=6)
  want1 = ref.generate([ref.chat_request(turn1, sampling=sp)])[0]
  r = client.chat.completions.create(model="smollm2-135m", messages=turn1, max_tokens=6,
                                     temperature=0)
  assert r.model_extra["x_sparsex"]["token_ids"] == want1.token_ids
  assert r.choices[0].message.content == want1.text
  turn2 = turn1 + [{"role": "assistant", "content": want1.text},
                   {"role": "user", "content": "And when?"}]
  want2 = ref.generate([ref.chat_request(turn2, sampling=sp)])[0]
  chunks = list(client.chat.completions.create(model="smollm2-135m", messages=turn2,
                                               max_tokens=6, temperature=0, stream=True))
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == want2.text
  x = chunks[-1].model_extra["x_sparsex"]
  assert x["token_ids"] == want2.token_ids
  assert x["reused_tokens"] + x["exact_tokens"] == want2.stats.n_reused + want2.stats.n_exact > 0
