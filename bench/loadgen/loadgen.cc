// A closed-loop gRPC load generator for the Match benchmarks (bench/match_vs_echo.py,
// bench/workers.py): C++ so that the client is not what limits the server on a 2-core machine.
//
// It sends pre-serialized request messages (read from a file) to one unary method through the
// generic stub, so it does no protobuf work of its own and serves the daemon and the echo
// server alike: the same bytes, the same channels, the same concurrency.
//
//   loadgen --target 127.0.0.1:50051 --ca ca.crt --cert gateway.crt --key gateway.key
//           --method /faceseal.v1.FaceSealService/Match --requests reqs.bin
//           --channels 4 --concurrency 16 --threads 1 --warmup 3 --seconds 15 [--expect-hex 0801]
//
// reqs.bin: each request as a 4-byte little-endian length followed by the serialized message;
// call i sends request i mod n. Each channel is its own TCP + TLS connection (a distinct
// channel argument keeps gRPC from sharing one subchannel), so that SO_REUSEPORT workers see
// several connections. Each thread drives its own completion queue with concurrency/threads
// calls outstanding at all times (a closed loop: a call is replaced as soon as it completes).
//
// Lines on stdout: "phase measure" when the measured window starts (after the warm-up),
// "phase done" when it ends (the caller samples the server's /proc CPU counters at those two
// lines), then one JSON object: calls completed in the window, errors by status code,
// responses that differ from --expect-hex, latency percentiles (µs, calls completed inside the
// window), and this process's own CPU time in the window (getrusage) per call.

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/credentials.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

using Clock = std::chrono::steady_clock;

namespace {

struct Options {
  std::string target, ca, cert, key, method, requests, expect_hex, server_name;
  int channels = 4, concurrency = 16, threads = 1;
  double warmup = 3.0, seconds = 15.0, deadline = 10.0;
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "loadgen: cannot read %s\n", path.c_str());
    std::exit(2);
  }
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<std::string> read_requests(const std::string& path) {
  std::string data = read_file(path);
  std::vector<std::string> out;
  size_t at = 0;
  while (at + 4 <= data.size()) {
    uint32_t n = uint8_t(data[at]) | uint8_t(data[at + 1]) << 8 | uint8_t(data[at + 2]) << 16 |
                 uint32_t(uint8_t(data[at + 3])) << 24;
    at += 4;
    if (at + n > data.size()) break;
    out.push_back(data.substr(at, n));
    at += n;
  }
  if (out.empty()) {
    std::fprintf(stderr, "loadgen: no requests in %s\n", path.c_str());
    std::exit(2);
  }
  return out;
}

std::string from_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) out.push_back(char(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

double cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
}

// 0: warm-up, 1: measuring, 2: stopping (no new calls).
std::atomic<int> phase{0};

struct Call {
  grpc::ClientContext* ctx = nullptr;
  grpc::ByteBuffer response;
  grpc::Status status;
  std::unique_ptr<grpc::ClientAsyncResponseReader<grpc::ByteBuffer>> reader;
  Clock::time_point start;
  int started_phase = 0;
  size_t channel = 0;
};

struct ThreadResult {
  std::vector<uint32_t> latencies_us;
  uint64_t calls = 0, unexpected = 0;
  std::map<int, uint64_t> errors;
};

void drive(const Options& o, std::vector<std::unique_ptr<grpc::GenericStub>>& stubs,
           const std::vector<grpc::ByteBuffer>& requests, const std::string& expect, int outstanding,
           size_t first_channel, ThreadResult* result) {
  grpc::CompletionQueue cq;
  std::vector<Call> calls(outstanding);
  size_t next_request = first_channel * 7919;
  auto start_call = [&](Call& c, size_t channel) {
    c.reader.reset();
    delete c.ctx;
    c.ctx = new grpc::ClientContext();
    c.ctx->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::milliseconds(int64_t(o.deadline * 1000)));
    c.channel = channel;
    c.start = Clock::now();
    c.started_phase = phase.load(std::memory_order_relaxed);
    c.response.Clear();
    c.reader = stubs[channel]->PrepareUnaryCall(c.ctx, o.method, requests[next_request++ % requests.size()], &cq);
    c.reader->StartCall();
    c.reader->Finish(&c.response, &c.status, &c);
  };
  for (int i = 0; i < outstanding; ++i) start_call(calls[i], (first_channel + i) % stubs.size());
  int live = outstanding;
  result->latencies_us.reserve(1 << 20);
  void* tag;
  bool ok;
  while (live > 0 && cq.Next(&tag, &ok)) {
    Call& c = *static_cast<Call*>(tag);
    auto end = Clock::now();
    int now_phase = phase.load(std::memory_order_relaxed);
    // A call counts when it completes inside the window; its latency only when it also started
    // there (a call straddling the start saw warm-up conditions for part of its life).
    if (now_phase == 1) {
      if (!c.status.ok()) {
        result->errors[int(c.status.error_code())]++;
      } else {
        result->calls++;
        if (c.started_phase == 1)
          result->latencies_us.push_back(
              uint32_t(std::chrono::duration_cast<std::chrono::microseconds>(end - c.start).count()));
        if (!expect.empty()) {
          std::vector<grpc::Slice> slices;
          std::string body;
          if (c.response.Dump(&slices).ok())
            for (auto& s : slices) body.append(reinterpret_cast<const char*>(s.begin()), s.size());
          if (body != expect) result->unexpected++;
        }
      }
    }
    if (now_phase == 2) {
      --live;
      continue;
    }
    start_call(c, c.channel);
  }
  for (auto& c : calls) {
    c.reader.reset();
    delete c.ctx;
  }
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
}

void usage() {
  std::fprintf(stderr,
               "usage: loadgen --target HOST:PORT --ca CA --cert CRT --key KEY --method /pkg.Svc/M --requests FILE\n"
               "               [--channels 4] [--concurrency 16] [--threads 1] [--warmup 3] [--seconds 15]\n"
               "               [--deadline 10] [--expect-hex HEX] [--server-name localhost]\n");
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (i + 1 >= argc) usage();
    std::string v = argv[++i];
    if (a == "--target") o.target = v;
    else if (a == "--ca") o.ca = v;
    else if (a == "--cert") o.cert = v;
    else if (a == "--key") o.key = v;
    else if (a == "--method") o.method = v;
    else if (a == "--requests") o.requests = v;
    else if (a == "--expect-hex") o.expect_hex = v;
    else if (a == "--server-name") o.server_name = v;
    else if (a == "--channels") o.channels = std::atoi(v.c_str());
    else if (a == "--concurrency") o.concurrency = std::atoi(v.c_str());
    else if (a == "--threads") o.threads = std::atoi(v.c_str());
    else if (a == "--warmup") o.warmup = std::atof(v.c_str());
    else if (a == "--seconds") o.seconds = std::atof(v.c_str());
    else if (a == "--deadline") o.deadline = std::atof(v.c_str());
    else usage();
  }
  if (o.target.empty() || o.ca.empty() || o.cert.empty() || o.key.empty() || o.method.empty() || o.requests.empty())
    usage();
  if (o.channels < 1 || o.threads < 1 || o.concurrency < o.threads || o.seconds <= 0 || o.seconds > 600 ||
      o.warmup < 0 || o.warmup > 600) {
    std::fprintf(stderr, "loadgen: need channels >= 1, 1 <= threads <= concurrency, 0 < seconds <= 600\n");
    return 2;
  }

  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = read_file(o.ca);
  ssl.pem_cert_chain = read_file(o.cert);
  ssl.pem_private_key = read_file(o.key);
  auto creds = grpc::SslCredentials(ssl);
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs;
  for (int i = 0; i < o.channels; ++i) {
    grpc::ChannelArguments args;
    args.SetInt("faceseal.loadgen.channel", i);  // distinct args: a connection of its own
    if (!o.server_name.empty()) args.SetSslTargetNameOverride(o.server_name);
    auto channel = grpc::CreateCustomChannel(o.target, creds, args);
    if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10))) {
      std::fprintf(stderr, "loadgen: channel %d did not connect to %s within 10 s\n", i, o.target.c_str());
      return 1;
    }
    stubs.push_back(std::make_unique<grpc::GenericStub>(channel));
  }

  std::vector<grpc::ByteBuffer> requests;
  for (auto& r : read_requests(o.requests)) {
    grpc::Slice slice(r);
    requests.emplace_back(&slice, 1);
  }
  const std::string expect = from_hex(o.expect_hex);

  std::vector<ThreadResult> results(o.threads);
  std::vector<std::thread> threads;
  for (int t = 0; t < o.threads; ++t) {
    int outstanding = o.concurrency / o.threads + (t < o.concurrency % o.threads ? 1 : 0);
    threads.emplace_back(drive, std::cref(o), std::ref(stubs), std::cref(requests), std::cref(expect), outstanding,
                         size_t(t) * outstanding, &results[t]);
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(o.warmup));
  double cpu0 = cpu_seconds();
  auto t0 = Clock::now();
  phase.store(1);
  std::printf("phase measure\n");
  std::fflush(stdout);
  std::this_thread::sleep_for(std::chrono::duration<double>(o.seconds));
  phase.store(2);
  auto t1 = Clock::now();
  double cpu1 = cpu_seconds();
  std::printf("phase done\n");
  std::fflush(stdout);
  for (auto& t : threads) t.join();

  std::vector<uint32_t> lat;
  uint64_t calls = 0, unexpected = 0;
  std::map<int, uint64_t> errors;
  for (auto& r : results) {
    lat.insert(lat.end(), r.latencies_us.begin(), r.latencies_us.end());
    calls += r.calls;
    unexpected += r.unexpected;
    for (auto& [code, n] : r.errors) errors[code] += n;
  }
  std::sort(lat.begin(), lat.end());
  auto pct = [&](double p) -> double {
    if (lat.empty()) return 0.0;
    size_t i = std::min(lat.size() - 1, size_t(p * (lat.size() - 1) + 0.5));
    return lat[i];
  };
  double seconds = std::chrono::duration<double>(t1 - t0).count();
  double cpu = cpu1 - cpu0;
  std::printf("{\"calls\": %" PRIu64 ", \"seconds\": %.4f, \"qps\": %.1f, \"p50_us\": %.0f, \"p90_us\": %.0f, "
              "\"p99_us\": %.0f, \"max_us\": %.0f, \"latency_samples\": %zu, \"unexpected_responses\": %" PRIu64
              ", \"cpu_seconds\": %.4f, \"cpu_us_per_call\": %.1f, \"channels\": %d, \"concurrency\": %d, "
              "\"threads\": %d, \"errors\": {",
              calls, seconds, calls / seconds, pct(0.50), pct(0.90), pct(0.99), lat.empty() ? 0.0 : double(lat.back()),
              lat.size(), unexpected, cpu, calls ? cpu / calls * 1e6 : 0.0, o.channels, o.concurrency, o.threads);
  bool first = true;
  for (auto& [code, n] : errors) {
    std::printf("%s\"%d\": %" PRIu64, first ? "" : ", ", code, n);
    first = false;
  }
  std::printf("}}\n");
  std::fflush(stdout);
  return 0;
}
