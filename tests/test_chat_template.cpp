// Chat templates: each family renders conversations exactly as its Jinja template does. The expected strings
// were produced by rendering the templates with jinja2 (Hugging Face's settings: trim_blocks, lstrip_blocks;
// bos_token "<s>", eos_token "</s>"). The templates of llama-bpe (Llama-3 base), qwen2 (Qwen3) and phi-3
// (phi-3-mini-4k) are read from the bundled vocab files; the others are the published templates of
// Llama-2-chat, Mistral-7B-Instruct-v0.1, Qwen2-Instruct, Llama-3-Instruct and Phi-3.5-mini, quoted below.
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "gguf/gguf.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

using namespace headroom;

namespace {

const std::map<std::string, std::string>& templates() {
  static const std::map<std::string, std::string> t = [] {
    // clang-format off
    std::map<std::string, std::string> m = {
    {"llama2",
     "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"},
    {"mistral",
     "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"},
    {"qwen2",
     "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"},
    {"llama3_instruct",
     "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"},
    {"phi35",
     "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"},
    };
    // clang-format on
    const std::string dir = test::shared("testdata/vocab/");
    m["llama3_base"] = gguf::File::open(dir + "ggml-vocab-llama-bpe.gguf")->get_str("tokenizer.chat_template");
    m["qwen3"] = gguf::File::open(dir + "ggml-vocab-qwen2.gguf")->get_str("tokenizer.chat_template");
    m["phi3_mini"] = gguf::File::open(dir + "ggml-vocab-phi-3.gguf")->get_str("tokenizer.chat_template");
    return m;
  }();
  return t;
}

const std::map<std::string, std::vector<ChatMessage>>& conversations() {
  static const std::map<std::string, std::vector<ChatMessage>> c = {
      {"sys3",
       {{"system", "You are terse."},
        {"user", "Hi there"},
        {"assistant", "Hello! How can I help?"},
        {"user", "What is 2+2?"}}},
      {"user1", {{"user", " Hi "}}},
      {"think", {{"user", "Hi"}, {"assistant", "<think>\nponder\n</think>\n\nHello"}}},
      {"ua", {{"user", "Hi"}, {"assistant", "Hello"}}},
  };
  return c;
}

struct Expected {
  const char* tmpl;
  const char* conv;
  bool add_generation_prompt;
  const char* text;
};

// Rendered by jinja2 (see the top of the file).
// clang-format off
const Expected kExpected[] = {
    {"llama3_base", "sys3", true,
     "<s><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
    {"llama3_base", "sys3", false,
     "<s><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
    {"llama3_base", "user1", true,
     "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
    {"llama3_base", "user1", false,
     "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
    {"llama3_base", "think", true,
     "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<think>\nponder\n</think>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
    {"llama3_base", "think", false,
     "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<think>\nponder\n</think>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
    {"llama3_base", "ua", true,
     "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
    {"llama3_base", "ua", false,
     "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
    {"qwen3", "sys3", true,
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"},
    {"qwen3", "sys3", false,
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"},
    {"qwen3", "user1", true,
     "<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\n"},
    {"qwen3", "user1", false,
     "<|im_start|>user\n Hi <|im_end|>\n"},
    {"qwen3", "think", true,
     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nponder\n</think>\n\nHello<|im_end|>\n<|im_start|>assistant\n"},
    {"qwen3", "think", false,
     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nponder\n</think>\n\nHello<|im_end|>\n"},
    {"qwen3", "ua", true,
     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n<|im_start|>assistant\n"},
    {"qwen3", "ua", false,
     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n"},
    {"phi3_mini", "sys3", true,
     "<s><|user|>\nHi there<|end|>\n<|assistant|>\nHello! How can I help?<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n"},
    {"phi3_mini", "sys3", false,
     "<s><|user|>\nHi there<|end|>\n<|assistant|>\nHello! How can I help?<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n"},
    {"phi3_mini", "user1", true,
     "<s><|user|>\n Hi <|end|>\n<|assistant|>\n"},
    {"phi3_mini", "user1", false,
     "<s><|user|>\n Hi <|end|>\n<|assistant|>\n"},
    {"phi3_mini", "think", true,
     "<s><|user|>\nHi<|end|>\n<|assistant|>\n<think>\nponder\n</think>\n\nHello<|end|>\n"},
    {"phi3_mini", "think", false,
     "<s><|user|>\nHi<|end|>\n<|assistant|>\n<think>\nponder\n</think>\n\nHello<|end|>\n"},
    {"phi3_mini", "ua", true,
     "<s><|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n"},
    {"phi3_mini", "ua", false,
     "<s><|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n"},
    {"llama2", "sys3", true,
     "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! How can I help? </s><s>[INST] What is 2+2? [/INST]"},
    {"llama2", "sys3", false,
     "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! How can I help? </s><s>[INST] What is 2+2? [/INST]"},
    {"llama2", "user1", true,
     "<s>[INST] Hi [/INST]"},
    {"llama2", "user1", false,
     "<s>[INST] Hi [/INST]"},
    {"llama2", "think", true,
     "<s>[INST] Hi [/INST] <think>\nponder\n</think>\n\nHello </s>"},
    {"llama2", "think", false,
     "<s>[INST] Hi [/INST] <think>\nponder\n</think>\n\nHello </s>"},
    {"llama2", "ua", true,
     "<s>[INST] Hi [/INST] Hello </s>"},
    {"llama2", "ua", false,
     "<s>[INST] Hi [/INST] Hello </s>"},
    {"mistral", "user1", true,
     "<s>[INST]  Hi  [/INST]"},
    {"mistral", "user1", false,
     "<s>[INST]  Hi  [/INST]"},
    {"mistral", "think", true,
     "<s>[INST] Hi [/INST]<think>\nponder\n</think>\n\nHello</s>"},
    {"mistral", "think", false,
     "<s>[INST] Hi [/INST]<think>\nponder\n</think>\n\nHello</s>"},
    {"mistral", "ua", true,
     "<s>[INST] Hi [/INST]Hello</s>"},
    {"mistral", "ua", false,
     "<s>[INST] Hi [/INST]Hello</s>"},
    {"qwen2", "sys3", true,
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"},
    {"qwen2", "sys3", false,
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"},
    {"qwen2", "user1", true,
     "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\n"},
    {"qwen2", "user1", false,
     "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n"},
    {"qwen2", "think", true,
     "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nponder\n</think>\n\nHello<|im_end|>\n<|im_start|>assistant\n"},
    {"qwen2", "think", false,
     "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nponder\n</think>\n\nHello<|im_end|>\n"},
    {"qwen2", "ua", true,
     "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n"},
    {"qwen2", "ua", false,
     "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"},
    {"llama3_instruct", "sys3", true,
     "<s><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
    {"llama3_instruct", "sys3", false,
     "<s><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"},
    {"llama3_instruct", "user1", true,
     "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
    {"llama3_instruct", "user1", false,
     "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"},
    {"llama3_instruct", "think", true,
     "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<think>\nponder\n</think>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
    {"llama3_instruct", "think", false,
     "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<think>\nponder\n</think>\n\nHello<|eot_id|>"},
    {"llama3_instruct", "ua", true,
     "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
    {"llama3_instruct", "ua", false,
     "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"},
    {"phi35", "sys3", true,
     "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\nHello! How can I help?<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n"},
    {"phi35", "sys3", false,
     "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\nHello! How can I help?<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n</s>"},
    {"phi35", "user1", true,
     "<|user|>\n Hi <|end|>\n<|assistant|>\n"},
    {"phi35", "user1", false,
     "<|user|>\n Hi <|end|>\n</s>"},
    {"phi35", "think", true,
     "<|user|>\nHi<|end|>\n<|assistant|>\n<think>\nponder\n</think>\n\nHello<|end|>\n<|assistant|>\n"},
    {"phi35", "think", false,
     "<|user|>\nHi<|end|>\n<|assistant|>\n<think>\nponder\n</think>\n\nHello<|end|>\n</s>"},
    {"phi35", "ua", true,
     "<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n<|assistant|>\n"},
    {"phi35", "ua", false,
     "<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n</s>"},
};
// clang-format on

TEST(TokenizerChatTemplate, DetectsFamilies) {
  const std::map<std::string, ChatTemplate::Kind> want = {
      {"llama3_base", ChatTemplate::Kind::Llama3}, {"llama3_instruct", ChatTemplate::Kind::Llama3},
      {"qwen3", ChatTemplate::Kind::ChatML},       {"qwen2", ChatTemplate::Kind::ChatML},
      {"phi3_mini", ChatTemplate::Kind::Phi3},     {"phi35", ChatTemplate::Kind::Phi3},
      {"llama2", ChatTemplate::Kind::Llama2},      {"mistral", ChatTemplate::Kind::Mistral},
  };
  for (const auto& [name, kind] : want) {
    const ChatTemplate ct = ChatTemplate::detect(templates().at(name));
    EXPECT_EQ(ct.kind(), kind) << name;
    EXPECT_TRUE(ct.recognised()) << name;
  }
  EXPECT_STREQ(ChatTemplate::detect(templates().at("qwen3")).name(), "chatml");
}

TEST(TokenizerChatTemplate, RendersLikeJinja) {
  int n = 0;
  for (const Expected& e : kExpected) {
    const ChatTemplate ct = ChatTemplate::detect(templates().at(e.tmpl));
    EXPECT_EQ(ct.apply(conversations().at(e.conv), e.add_generation_prompt, "<s>", "</s>"), e.text)
        << e.tmpl << " / " << e.conv << " / add_generation_prompt=" << e.add_generation_prompt;
    ++n;
  }
  EXPECT_EQ(n, 62);
}

TEST(TokenizerChatTemplate, UnknownTextIsPlain) {
  for (const std::string t : {"", "{{ messages }}", "### Instruction:\n{{ content }}\n### Response:"}) {
    const ChatTemplate ct = ChatTemplate::detect(t);
    EXPECT_EQ(ct.kind(), ChatTemplate::Kind::Plain);
    EXPECT_FALSE(ct.recognised());
    EXPECT_STREQ(ct.name(), "plain");
  }
  const ChatTemplate plain = ChatTemplate::detect("");
  EXPECT_EQ(plain.apply({{"system", "Be brief."}, {"user", "Hi"}}, true, "<s>"),
            "system: Be brief.\nuser: Hi\nassistant:");
  EXPECT_EQ(plain.apply({{"user", "Hi"}}, false), "user: Hi\n");
}

TEST(TokenizerChatTemplate, RoleErrorsAreOneLine) {
  for (const char* name : {"llama2", "mistral"}) {
    const ChatTemplate ct = ChatTemplate::detect(templates().at(name));
    try {
      ct.apply({{"user", "a"}, {"user", "b"}}, true, "<s>", "</s>");
      ADD_FAILURE() << name << ": no error for two user turns in a row";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("alternate"), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
    }
  }
}

TEST(TokenizerChatTemplate, MistralPutsSystemBeforeFirstUserTurn) {
  // Mistral v0.1's template rejects system messages; headroom keeps them, in front of the first user turn.
  const ChatTemplate ct = ChatTemplate::detect(templates().at("mistral"));
  EXPECT_EQ(
      ct.apply({{"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello"}, {"user", "Bye"}}, true, "<s>", "</s>"),
      "<s>[INST] Be brief.\n\nHi [/INST]Hello</s>[INST] Bye [/INST]");
}

TEST(TokenizerChatTemplate, ChatMLDefaultSystemPrompts) {
  // Qwen2.5 and SmolLM2 write a system prompt of their own when the conversation has none.
  const std::string qwen25 =
      "{%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + "
      "'<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
      "You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}";
  EXPECT_EQ(ChatTemplate::detect(qwen25).apply({{"user", "Hi"}}, true),
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(ChatTemplate::detect(qwen25).apply({{"system", "S"}, {"user", "Hi"}}, false),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
}

TEST(TokenizerChatTemplate, Llama31DateFromTemplateText) {
  // Llama-3.1 writes its default date as `date_string = "..."`; the first such assignment wins, spaces around
  // '=' are allowed, and a mention that is not an assignment is skipped.
  auto today = [](const std::string& tail) {
    const std::string t = "<|start_header_id|>{{ 'Cutting Knowledge Date: December 2023' }}" + tail;
    const std::string out = ChatTemplate::detect(t).apply({{"user", "Hi"}}, true);
    const std::string key = "Today Date: ";
    const size_t at = out.find(key);
    return at == std::string::npos ? std::string("(none)") : out.substr(at + key.size(), out.find('\n', at) - at - key.size());
  };
  EXPECT_EQ(today("{% set date_string = \"26 Jul 2024\" %}"), "26 Jul 2024");
  EXPECT_EQ(today("{% if not date_string is defined %}{% set date_string \n=\t\"01 Feb 2031\" %}"), "01 Feb 2031");
  EXPECT_EQ(today("date_string=\"A\" date_string = \"B\""), "A");
  EXPECT_EQ(today("date_string = \"\""), "");
  EXPECT_EQ(today("date_string = 'single quotes'"), "26 Jul 2024");  // not the pattern: the built-in default
  EXPECT_EQ(today("date_string = \"unterminated"), "26 Jul 2024");
  // 40 000 characters in the quotes: found by plain search (a backtracking regex overflowed the stack here).
  EXPECT_EQ(today("date_string = \"" + std::string(40000, 'x') + "\"").size(), 40000u);
  EXPECT_EQ(today("date_string = \"" + std::string(40000, 'x')), "26 Jul 2024");
}

TEST(TokenizerChatTemplate, RenderedPromptTokenizesWithSpecialTokens) {
  // The rendered prompt, tokenized with parse_special, holds the template's control tokens as single ids.
  auto f = gguf::File::open(test::shared("testdata/vocab/ggml-vocab-qwen2.gguf"));
  auto tok = Tokenizer::from_gguf(*f);
  const ChatTemplate ct = ChatTemplate::detect(tok->chat_template());
  const std::string text = ct.apply(conversations().at("sys3"), true);
  const auto ids = tok->encode(text, tok->add_bos(), true);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 151644), 5);  // <|im_start|>
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 151645), 4);  // <|im_end|>
  EXPECT_EQ(tok->decode(ids, true), text);
}

}  // namespace
