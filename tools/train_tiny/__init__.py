"""Training the small JetMoe bundled with the server, and the Llama-style tokenizer trainer the tests reuse."""
