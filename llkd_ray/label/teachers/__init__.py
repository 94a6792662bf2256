"""Teachers: one interface (a batch of texts -> a K-class distribution per text), three backends.

- ``base`` — ``TeacherOutput``, the ``Teacher`` protocol, ``TeacherIdentity``, ``TeacherPlan``,
  ``Sink``, ``normalise_scores``, ``label_frame``: what every backend shares; imports no backend,
  so everything else can build on it.
- ``prompts`` — ``PromptEncoder``, ``render_prompt``, ``answer_continuations``,
  ``check_first_tokens``, ``load_tokenizer``, ``encode_prompts``: the one place LLM prompts are
  rendered and tokenized, so ``hf`` and ``vllm`` see identical token ids.
- ``embedding`` — ``EmbeddingTeacher``, ``PlainSentenceEncoder``: zero-shot from a sentence
  embedding model (plain torch, no Ray).
- ``hf`` — ``HFTeacher``: a ``transformers`` causal LM scoring the verbalizers (plain torch, no
  Ray, no vLLM).
- ``vllm`` — ``VLLMTeacher`` and its glue: ``ray.data.llm``'s engine stage as its own Ray Data
  stage (Ray and vLLM imported inside functions).
- ``registry`` — ``Backend``, ``BACKENDS``, ``backend_spec``, ``build_local_teacher``: one entry
  per backend; it imports the backends, so none of them imports it.
- ``check`` — ``check_teacher``, ``prompt_hash``: everything checkable before data is read,
  giving the ``TeacherPlan``; above the registry, which it asks whether a backend is an LLM.
"""
