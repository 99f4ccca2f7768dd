//! Small measuring tools: per-process CPU time and RSS from /proc,
//! percentiles, the file-descriptor limit, and loopback sockets bound to a
//! chosen source address (one 127.0.0.x holds ~28k ephemeral ports; 100k
//! sessions need several).
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};

/// Clock ticks per second for /proc/PID/stat times.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces: fields start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("unreadable /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of the whole line, utime 14, stime 15.
    let utime: f64 = fields.get(11).unwrap_or(&"0").parse()?;
    let stime: f64 = fields.get(12).unwrap_or(&"0").parse()?;
    Ok((utime + stime) / clock_ticks())
}

/// A field of /proc/PID/status in KiB (VmRSS, RssAnon, VmHWM, ...).
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(v) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            return Ok(v.trim().trim_end_matches("kB").trim().parse()?);
        }
    }
    anyhow::bail!("{field} not in /proc/{pid}/status")
}

/// CPU seconds of several processes, sampled together.
pub struct CpuSample(pub Vec<f64>);

pub fn sample_cpu(pids: &[u32]) -> anyhow::Result<CpuSample> {
    pids.iter()
        .map(|p| cpu_seconds(*p))
        .collect::<anyhow::Result<Vec<_>>>()
        .map(CpuSample)
}

impl CpuSample {
    pub fn delta(&self, earlier: &CpuSample) -> Vec<f64> {
        self.0.iter().zip(&earlier.0).map(|(a, b)| a - b).collect()
    }
}

/// Latencies in microseconds, sorted once.
pub struct Latencies(Vec<u64>);

impl Latencies {
    pub fn new(mut v: Vec<u64>) -> Self {
        v.sort_unstable();
        Self(v)
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Nearest-rank percentile, in milliseconds.
    pub fn pct_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let rank = ((q / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1] as f64 / 1000.0
    }
    pub fn max_ms(&self) -> f64 {
        self.0.last().map_or(f64::NAN, |v| *v as f64 / 1000.0)
    }
}

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Raises RLIMIT_NOFILE (soft and hard) to at least `want`, within the
/// kernel's fs.nr_open. Children started afterwards inherit it. Returns the
/// soft limit now in force.
pub fn raise_nofile(want: u64) -> anyhow::Result<u64> {
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        anyhow::bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= want {
        return Ok(lim.rlim_cur);
    }
    let target = want.min(nr_open);
    let new = libc::rlimit {
        rlim_cur: target,
        rlim_max: target.max(lim.rlim_max),
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        // Not root: go as high as the hard limit allows.
        let soft = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) };
        return Ok(lim.rlim_max);
    }
    Ok(target)
}

/// Loopback source addresses 127.0.0.2 .. 127.0.0.(1+n).
pub fn source_addrs(n: usize) -> Vec<Ipv4Addr> {
    (0..n.clamp(1, 250))
        .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i as u8))
        .collect()
}

/// Enough source addresses for `sessions` live sockets (20k per address,
/// well inside the 28k ephemeral ports of each).
pub fn addrs_for(sessions: usize) -> usize {
    sessions.div_ceil(20_000).max(1) + 1
}

/// TCP connect from `source` (port chosen by the kernel) to `dest`.
pub async fn connect_from(source: Ipv4Addr, dest: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    socket.connect(dest).await
}

pub fn fmt_rate(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// The machine, for the report header.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    // Other work on the machine skews every figure: show how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    format!("{cpu}, {cores} cores, {mem_gib:.0} GiB; load average {load} at start")
}

pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Calls per Redis command so far (`INFO commandstats`), by command name.
pub async fn redis_calls(url: &str) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await?;
    Ok(parse_commandstats(&info))
}

/// `cmdstat_evalsha:calls=12,usec=...` lines into {"evalsha": 12}.
fn parse_commandstats(info: &str) -> std::collections::BTreeMap<String, u64> {
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

/// The commands called between two `redis_calls`, most called first.
pub fn redis_calls_delta(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = after
        .iter()
        .map(|(k, n)| (k.clone(), n - before.get(k).copied().unwrap_or(0).min(*n)))
        .filter(|(_, n)| *n > 0)
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

#[cfg(test)]
mod tests {
    #[test]
    fn commandstats() {
        let info = "# Commandstats\r\ncmdstat_evalsha:calls=12,usec=30,usec_per_call=2.5\r\ncmdstat_get:calls=3,usec=1\r\n";
        let m = super::parse_commandstats(info);
        assert_eq!(m.get("evalsha"), Some(&12));
        assert_eq!(m.get("get"), Some(&3));
        let before = [("get".to_string(), 1u64)].into_iter().collect();
        let d = super::redis_calls_delta(&before, &m);
        assert_eq!(d, vec![("evalsha".into(), 12), ("get".into(), 2)]);
    }
}
