//! Load drivers for `bench/run` that wrk cannot express. Raw HTTP/1.1 over loopback, one
//! JSON line of results on stdout.
//!
//! `wave`: opens N connections first, then every caller sends one GET of the same path at the
//! same moment (released together by one signal) and records its own latency, from just before
//! its write to the last byte of the answer. This is "N concurrent callers of one new key".
//! ADDR may list several servers separated by commas (replicas of one gateway): caller i
//! connects to the i-th mod their number, so the wave spreads evenly over them.
//!
//! `storm`: C clients, each on its own keep-alive connection, poll one of T tasks (client i
//! polls task i mod T) every interval for a duration, each starting at a random phase within
//! the first interval so the clients are not synchronised. Records every poll's latency.
//!
//! ```text
//! bench-client wave  ADDR[,ADDR...] PATH N [HEADER]
//! bench-client storm ADDR PATH_TEMPLATE CLIENTS TASKS INTERVAL_MS DURATION_MS [HEADER]
//! ```
//! `PATH_TEMPLATE` has `{}` where the task number goes; `HEADER` is one extra request header,
//! e.g. `Authorization: Bearer KEY`.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// One keep-alive HTTP/1.1 connection that sends GETs and reads whole answers.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends one request and returns the status code once the whole body is read.
    async fn get(&mut self, request: &[u8]) -> std::io::Result<u16> {
        self.stream.write_all(request).await?;
        self.buf.clear();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_ascii_lowercase();
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or(std::io::ErrorKind::InvalidData)?;
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while self.buf.len() < head_end + length {
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok(status)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn request(path: &str, header: &Option<String>) -> Vec<u8> {
    let extra = header
        .as_ref()
        .map(|h| format!("{h}\r\n"))
        .unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n").into_bytes()
}

/// Latencies in microseconds, sorted; statuses counted; failures counted.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    statuses: BTreeMap<String, u64>,
    errors: u64,
}

impl Tally {
    fn add(&mut self, result: std::io::Result<u16>, elapsed: Duration) {
        match result {
            Ok(status) => {
                *self.statuses.entry(status.to_string()).or_default() += 1;
                self.latencies_us.push(elapsed.as_micros() as u64);
            }
            Err(_) => self.errors += 1,
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.errors += other.errors;
    }

    fn json(mut self, extra: &str) -> String {
        self.latencies_us.sort_unstable();
        let q = |p: f64| -> u64 {
            if self.latencies_us.is_empty() {
                return 0;
            }
            let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
            self.latencies_us[i]
        };
        let within_50ms = self.latencies_us.iter().filter(|&&l| l <= 50_000).count();
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        format!(
            "{{\"answered\":{},\"errors\":{},\"statuses\":{{{}}},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"max_us\":{},\"min_us\":{},\"within_50ms\":{}{}}}",
            self.latencies_us.len(),
            self.errors,
            statuses.join(","),
            q(0.50),
            q(0.90),
            q(0.99),
            self.latencies_us.last().copied().unwrap_or(0),
            self.latencies_us.first().copied().unwrap_or(0),
            within_50ms,
            extra
        )
    }
}

async fn wave(addrs: Vec<SocketAddr>, path: String, n: usize, header: Option<String>) {
    let request = Arc::new(request(&path, &header));
    let (go_tx, go_rx) = watch::channel(false);
    let mut conns = Vec::with_capacity(n);
    for addr in addrs.iter().cycle().take(n) {
        conns.push(Conn::open(*addr).await.expect("connect"));
    }
    let mut tasks = Vec::with_capacity(n);
    for mut conn in conns {
        let mut go = go_rx.clone();
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let _ = go.wait_for(|&g| g).await;
            let started = Instant::now();
            let result = conn.get(&request).await;
            (started, result, started.elapsed())
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    go_tx.send_replace(true);
    let mut tally = Tally::default();
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    for task in tasks {
        let (started, result, elapsed) = task.await.expect("caller task");
        first = Some(first.map_or(started, |f| f.min(started)));
        last = Some(last.map_or(started, |l| l.max(started)));
        tally.add(result, elapsed);
    }
    let spread = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f).as_micros(),
        _ => 0,
    };
    println!("{}", tally.json(&format!(",\"send_spread_us\":{spread}")));
}

async fn storm(
    addr: SocketAddr,
    template: String,
    clients: usize,
    tasks: usize,
    interval: Duration,
    duration: Duration,
    header: Option<String>,
) {
    let started = Instant::now();
    let deadline = started + duration;
    let mut handles = Vec::with_capacity(clients);
    for i in 0..clients {
        let mut conn = Conn::open(addr).await.expect("connect");
        let request = request(&template.replace("{}", &(i % tasks).to_string()), &header);
        // A fixed, evenly spread phase per client (deterministic, no RNG dependency).
        let phase = interval.mul_f64((i as f64 * 0.618_034) % 1.0);
        handles.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut next = tokio::time::Instant::from_std(started + phase);
            loop {
                tokio::time::sleep_until(next).await;
                if Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                let result = conn.get(&request).await;
                let failed = result.is_err();
                tally.add(result, t.elapsed());
                if failed {
                    match Conn::open(addr).await {
                        Ok(c) => conn = c,
                        Err(_) => break,
                    }
                }
                next += interval;
            }
            tally
        }));
    }
    let mut tally = Tally::default();
    for h in handles {
        tally.merge(h.await.expect("client task"));
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{}", tally.json(&format!(",\"seconds\":{secs:.3}")));
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || -> ! {
        eprintln!(
            "usage: bench-client wave ADDR[,ADDR...] PATH N [HEADER]\n       bench-client storm ADDR PATH_TEMPLATE CLIENTS TASKS INTERVAL_MS DURATION_MS [HEADER]"
        );
        std::process::exit(64)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match args.first().map(String::as_str) {
        Some("wave") if args.len() >= 4 => {
            let addrs: Vec<SocketAddr> = args[1]
                .split(',')
                .map(|a| a.parse().unwrap_or_else(|_| usage()))
                .collect();
            let n = args[3].parse().unwrap_or_else(|_| usage());
            runtime.block_on(wave(addrs, args[2].clone(), n, args.get(4).cloned()));
        }
        Some("storm") if args.len() >= 7 => {
            let addr = args[1].parse().unwrap_or_else(|_| usage());
            let num = |i: usize| -> u64 { args[i].parse().unwrap_or_else(|_| usage()) };
            runtime.block_on(storm(
                addr,
                args[2].clone(),
                num(3) as usize,
                num(4) as usize,
                Duration::from_millis(num(5)),
                Duration::from_millis(num(6)),
                args.get(7).cloned(),
            ));
        }
        _ => usage(),
    }
}
