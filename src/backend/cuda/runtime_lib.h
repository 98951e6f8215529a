// A shared library opened at run time (dlopen) and kept loaded for the process: cuBLAS and NCCL, which a CUDA
// build uses without linking them (linking cuBLAS alone maps ~200 MB into every process).
#pragma once

#include <initializer_list>
#include <string>

#include <dlfcn.h>

#include "util/error.h"

namespace headroom::cuda {

struct RuntimeLib {
  void* handle = nullptr;
  std::string name;  // the name that opened it

  // The first of `names` that loads; throws Error (one line) "`what`: ..." when none does.
  static RuntimeLib open(std::initializer_list<std::string> names, const std::string& what) {
    RuntimeLib lib;
    std::string first_error;
    for (const std::string& n : names) {
      lib.handle = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (lib.handle) {
        lib.name = n;
        return lib;
      }
      if (first_error.empty()) first_error = dlerror();
    }
    fail("{} ({})", what, first_error);
  }
  // f = the symbol `sym`, or Error "`who`: <name> has no <sym>".
  template <typename F>
  void bind(F& f, const char* sym, const char* who) const {
    void* p = dlsym(handle, sym);
    if (!p) fail("{}: {} has no {}", who, name, sym);
    f = reinterpret_cast<F>(p);
  }
};

}  // namespace headroom::cuda
