"""Training data: the embedded default dataset, user files, formats, prompt templates, masking, packing, collation.

    record (dict)  --render_segments-->  [(text, trainable), ...]  --tokenize_example-->  {input_ids, labels}
        alpaca: {instruction, input, output}       prompt segment is masked (labels -100) unless train_on_inputs
        chat:   {messages: [{role, content}]}      only assistant turns are trained
        text:   {text}                             every token is trained (causal LM on raw text)
    examples --pack_examples--> fixed-length blocks with per-example position_ids   --collate--> tensors

    formats/    one module per row format (detect, validate, render): the registry
    files       reading JSON/JSONL/text/`datasets` folders      templates   Alpaca / chat prompt text
    tokenize    masking, truncation, packing, collation         embedded    the default dataset
    answers     exact-match scoring

Every function here is pure (no model, no Trainer); the training loop composes them. This package keeps every
name the old lorakit/train/data.py module had.
"""
from lorakit.train.data.answers import answer_matches, normalize_answer  # noqa: F401
from lorakit.train.data.embedded import (EMBEDDED_SEED, INSTRUCTIONS, SPLIT_SIZES, TASKS,  # noqa: F401
                                         analogy_split, balanced, embedded_dataset, embedded_split, package_file,
                                         rank_key, record, reviews, tweets)
from lorakit.train.data.files import (TEXT_SUFFIXES, LoadedData, collect, json_rows, load_records,  # noqa: F401
                                      load_saved_datasets)
from lorakit.train.data.formats import FORMATS, DataFormat, render_segments, row_kind, validate_row  # noqa: F401
from lorakit.train.data.templates import (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, TEMPLATES,  # noqa: F401
                                          alpaca_messages, chat_text, render_prompt, resolve_template)
from lorakit.train.data.tokenize import (IGNORE_INDEX, collate, pack_examples, tokenize_example,  # noqa: F401
                                         tokenize_records)

# the old module's private names, for code that reached for them
_row_kind, _balanced, _tweets, _reviews, _embedded, _chat_text = row_kind, balanced, tweets, reviews, embedded_split, chat_text
_json_rows, _collect, _load_saved_datasets, _package_file, _rank = json_rows, collect, load_saved_datasets, package_file, rank_key
_analogy_split, _record = analogy_split, record
