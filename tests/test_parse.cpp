// The strict string -> number parsers (util/parse.h) and the budget parser built on them.
#include <gtest/gtest.h>

#include "kv/kv_cache.h"
#include "util/error.h"
#include "util/parse.h"

using namespace headroom;

TEST(Parse, TokensAcceptPlainAndK) {
  EXPECT_EQ(parse_tokens("4096", "--ctx", 64, kMaxContext), 4096);
  EXPECT_EQ(parse_tokens("4k", "--ctx", 64, kMaxContext), 4096);
  EXPECT_EQ(parse_tokens("1.5K", "--ctx", 64, kMaxContext), 1536);
  EXPECT_EQ(parse_tokens("0", "-c", 0, kMaxContext), 0);
  for (const char* bad : {"", "k", "-5", "+5", "nan", "inf", "1e3", "0x10", "4kk", "4 k", "1.5", "63", "16385k", "4.", ".5k"})
    EXPECT_THROW(parse_tokens(bad, "--ctx", 64, kMaxContext), Error) << bad;
  try {
    parse_tokens("nan", "--ctx", 64, kMaxContext);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--ctx"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("64..16777216"), std::string::npos) << e.what();
  }
}

TEST(Parse, DepthsRangeAndList) {
  EXPECT_EQ(parse_depths("0:100:25", "--depths"), (std::vector<double>{0, 0.25, 0.5, 0.75, 1}));
  EXPECT_EQ(parse_depths("10,50,90", "--depths"), (std::vector<double>{0.1, 0.5, 0.9}));
  EXPECT_EQ(parse_depths("0:100:0.1", "--depths").size(), 1001u);
  EXPECT_EQ(parse_depths("0:100:30", "--depths").back(), 0.9);
  for (const char* bad : {"", "0:100:0.01", "0:100:0", "0:100", "0:100:10:1", "50:10:5", "nan", "10,,20", "101", "-5",
                          "0:100:1e-300", "1,2,x"})
    EXPECT_THROW(parse_depths(bad, "--depths"), Error) << bad;
}

TEST(Parse, NumRange) {
  NumRange r{0, 1};
  EXPECT_EQ(r.check(0), "");
  EXPECT_EQ(r.check(1), "");
  EXPECT_NE(r.check(1.5), "");
  EXPECT_NE(r.check(std::nan("")), "");
  NumRange open{0, 10, true};
  EXPECT_NE(open.check(0), "");
  EXPECT_EQ(open.check(1e-6), "");
}

TEST(KVBudgetParse, StrictAndBounded) {
  EXPECT_EQ(KVBudget::parse("2147483647").value, 2147483647.0);
  EXPECT_EQ(KVBudget::parse("0.5%").value, 0.5);
  EXPECT_EQ(KVBudget::parse("1.5GiB").value, 1.5 * 1024 * 1024 * 1024);
  for (const char* bad : {"1.5.3%", "99999999999999999999", "2147483648", "99999999999GiB", "1e3", "nan", "inf%", "+5",
                          " 5", "5 ", "0.1B", ".5%", "5.%", "25%%"})
    EXPECT_THROW(KVBudget::parse(bad), Error) << bad;
  try {
    KVBudget::parse("x", "--budget");
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("invalid --budget \"x\"", 0), 0u) << e.what();
  }
}
