// Checks and reads for every file path the program is given (models, prompt files, head maps, corpora).
//
// A path that is missing, a directory, a FIFO or a device is refused before it is opened (opening a FIFO
// for reading blocks until a writer appears, so it would hang the program). Text reads are capped: a file
// larger than the cap is refused instead of filling memory. Errors are one line naming `what` and the path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace headroom {

// Throws headroom::Error unless `path` exists and is a regular file; returns its size in bytes.
// `what` names the role of the file in the message ("model", "prompt file", "head map", ...).
uint64_t check_regular_file(const std::string& path, const char* what);

// check_regular_file, then reads the whole file; a file of more than max_bytes is an error naming the cap.
std::string read_text_file(const std::string& path, const char* what, size_t max_bytes);

}  // namespace headroom
