"""Tokenizer, templates and labels, images, the Grain pipeline, the TFDS builder.

Public entry points (import them from their modules; this package imports nothing eagerly,
so evaluation code can take the templates without Grain or TFDS):

  tokenizer.Tokenizer(path)                   legacy LLaMA SentencePiece wrapper
  templates.get_template / build_prompt / render_segments
  labels.tokenize_conversation(...)           input_ids and loss labels of a conversation
  conversations.parse_record / relabel_self_questions
  images.load_pixels / normalize              CLIP preprocessing
  pipeline.make_pipeline(cfg, batch_size=...) Grain pipeline -> fixed-shape batches
  pipeline.make_example_builder(cfg)          one record -> one example (show-example, eval)
  tfds_builder.build_dataset(...)             JSON + images -> ArrayRecord shards
  sources.register_source(...)                a data source by name (`data.source`)
  errors.BadRecord, errors.REASONS            skip reasons and their fixes
"""
