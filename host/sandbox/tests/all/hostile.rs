//! Plugins that misbehave on purpose: each gets its own error, the host keeps serving, and
//! a good plugin still works after each.

use std::time::Duration;

use lathe_sandbox::{CallError, Kind, LimitSetBy, Limits, LoadError, Runtime, RuntimeConfig};

use crate::*;

/// A 32 MiB memory cap; a short deadline only for the plugin that loops (the others do
/// real work that a loaded CI machine may slow down a lot).
fn strict_runtime(timeout: Duration) -> Runtime {
    Runtime::new(RuntimeConfig {
        limits: Limits {
            timeout,
            memory_bytes: 32 << 20,
            ..Limits::default()
        },
        ..RuntimeConfig::default()
    })
    .unwrap()
}

const GENEROUS: Duration = Duration::from_secs(30);

/// After any failure, a good plugin on the same runtime still scores.
fn good_still_works(rt: &Runtime) {
    let mut em = builtin(rt, "exact-match").instance("{}").unwrap();
    assert_eq!(em.score("Paris", "Paris").unwrap().value, 1.0);
}

fn fails_with(name: &str, check: impl Fn(&CallError) -> bool) -> CallError {
    let timeout = if name == "infinite-loop" { Duration::from_millis(300) } else { GENEROUS };
    let rt = strict_runtime(timeout);
    let plugin = rt.load(&hostile_bytes(name)).unwrap_or_else(|e| panic!("{name} loads: {e}"));
    let mut inst = plugin.instance("{}").unwrap();
    let err = inst.score("x", "y").expect_err(name);
    assert!(check(&err), "{name}: unexpected error {err:?}");
    // The same instance is usable again (re-instantiated), and fails the same way.
    let again = inst.score("x", "y").expect_err(name);
    assert!(check(&again), "{name} again: {again:?}");
    good_still_works(&rt);
    err
}

#[test]
fn an_infinite_loop_times_out() {
    let e = fails_with("infinite-loop", |e| matches!(e, CallError::Timeout { .. }));
    assert!(e.to_string().contains("time limit"), "{e}");
}

#[test]
fn a_memory_bomb_hits_the_cap() {
    let e = fails_with("memory-bomb", |e| matches!(e, CallError::MemoryExhausted { limit_bytes, .. } if *limit_bytes == 32 << 20));
    assert!(e.to_string().contains("memory"), "{e}");
}

/// A plugin whose initial memory is over the cap cannot start: its upload is refused with
/// what it needs and the cap, not as a trap; held to less after loading, its instance
/// says the same.
#[test]
fn a_plugin_too_big_to_start_says_what_it_needs() {
    let rt = strict_runtime(GENEROUS);
    let e = rt.load(&hostile_bytes("big-start")).expect_err("48 MiB at start under a 32 MiB cap");
    let LoadError::Start(CallError::StartMemory { needs_bytes, limit_bytes, set_by: LimitSetBy::Host(Kind::Scorer), .. }) = e else { panic!("{e:?}") };
    assert!(needs_bytes > 48 << 20 && limit_bytes == 32 << 20, "{e:?}");
    let said = format!("plugin `(uploaded plugin)` needs {needs_bytes} bytes of memory to start, over the 33554432-byte cap (the host's limit for scorer plugins)");
    assert_eq!(e.to_string(), said);
    good_still_works(&rt);
    // Under the default 64 MiB it loads and scores, until held to 32 MiB.
    let roomy = Runtime::new(RuntimeConfig::default()).unwrap();
    let plugin = roomy.load(&hostile_bytes("big-start")).unwrap();
    assert_eq!(plugin.instance("{}").unwrap().score("x", "y").unwrap().value, 0.0);
    let Err(e) = plugin.with_limits(32 << 20, GENEROUS).instance("{}") else { panic!("held to 32 MiB, it started") };
    assert!(matches!(e, CallError::StartMemory { limit_bytes, set_by: LimitSetBy::Request, .. } if limit_bytes == 32 << 20), "{e:?}");
    assert!(e.to_string().starts_with("plugin `hostile-big-start` needs "), "{e}");
}

/// A plugin held below the runtime's limits (a pack's plugin runs with what it asked for)
/// hits its own cap and deadline, and the error states them.
#[test]
fn a_plugin_held_to_tighter_limits_hits_those() {
    let rt = strict_runtime(GENEROUS);
    let bomb = rt.load(&hostile_bytes("memory-bomb")).unwrap().with_limits(8 << 20, GENEROUS);
    assert_eq!(bomb.limits().memory_bytes, 8 << 20);
    let e = bomb.instance("{}").unwrap().score("x", "y").expect_err("the bomb");
    assert!(matches!(e, CallError::MemoryExhausted { limit_bytes, .. } if limit_bytes == 8 << 20), "{e:?}");
    // Asking for more than the runtime allows gets the runtime's.
    assert_eq!(rt.load(&hostile_bytes("memory-bomb")).unwrap().with_limits(1 << 30, GENEROUS).limits().memory_bytes, 32 << 20);
    let looper = rt.load(&hostile_bytes("infinite-loop")).unwrap().with_limits(32 << 20, Duration::from_millis(200));
    let e = looper.instance("{}").unwrap().score("x", "y").expect_err("the loop");
    assert!(matches!(e, CallError::Timeout { limit, .. } if limit == Duration::from_millis(200)), "{e:?}");
    good_still_works(&rt);
}

#[test]
fn unbounded_recursion_overflows_the_stack() {
    fails_with("recursion", |e| matches!(e, CallError::StackOverflow { .. }));
}

#[test]
fn a_huge_output_is_refused() {
    fails_with("huge-output", |e| matches!(e, CallError::OutputTooLarge { bytes, .. } if *bytes > 16 << 20));
}

#[test]
fn a_panic_fails_the_call_with_its_message() {
    let e = fails_with("panic", |e| matches!(e, CallError::Panic { .. }));
    assert!(e.to_string().contains("boom: prediction was \"x\""), "{e}");
}

#[test]
fn a_trap_resets_the_instance_state() {
    let rt = strict_runtime(GENEROUS);
    let mut inst = rt.load(&hostile_bytes("flaky")).unwrap().instance("{}").unwrap();
    assert_eq!(inst.score("a", "b").unwrap().value, 0.0);
    assert_eq!(inst.score("a", "b").unwrap().value, 1.0);
    assert!(matches!(inst.score("trap", "b"), Err(CallError::Trap { .. })));
    assert_eq!(inst.score("a", "b").unwrap().value, 0.0, "a fresh instance after the trap");
}

#[test]
fn files_and_environment_are_out_of_reach() {
    let rt = strict_runtime(GENEROUS);
    let mut inst = rt.load(&hostile_bytes("fs-open")).unwrap().instance("{}").unwrap();
    let s = inst.score("x", "/etc/passwd").unwrap();
    let details: Vec<&str> = s.details.iter().map(|d| d.0.as_str()).collect();
    assert!(details[0].starts_with("denied"), "{details:?}");
    assert!(details[1].starts_with("denied"), "{details:?}");
    assert_eq!(details[2], "env: 0");
    good_still_works(&rt);
}

#[test]
fn sockets_are_denied() {
    let rt = strict_runtime(GENEROUS);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut inst = rt.load(&hostile_bytes("socket")).unwrap().instance("{}").unwrap();
    let s = inst.score("x", &addr).unwrap();
    assert!(s.details[0].0.starts_with("denied"), "{:?}", s.details);
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "nothing connected");
    good_still_works(&rt);
}

#[test]
fn bad_uploads_are_refused_with_the_reason() {
    let rt = runtime();
    let e = rt.load(&hostile_bytes("wrong-world")).unwrap_err();
    assert!(matches!(e, LoadError::UnknownWorld { .. }), "{e:?}");
    assert!(e.to_string().contains("add") && e.to_string().contains("0.1.0"), "{e}");

    let core_module = b"\0asm\x01\0\0\0";
    assert!(matches!(rt.load(core_module), Err(LoadError::NotAComponent)));

    let mut noise = vec![0u8; 4096];
    let mut x: u32 = 12345;
    for b in noise.iter_mut() {
        x = x.wrapping_mul(1103515245).wrapping_add(12345);
        *b = (x >> 16) as u8;
    }
    assert!(matches!(rt.load(&noise), Err(LoadError::NotWasm)));

    // A component header over garbage: recognised as a component, refused as invalid.
    let mut broken = b"\0asm\x0d\0\x01\0".to_vec();
    broken.extend_from_slice(&noise[..64]);
    assert!(matches!(rt.load(&broken), Err(LoadError::Invalid(_))), "{:?}", rt.load(&broken).err());

    let small = Runtime::new(RuntimeConfig { limits: Limits { max_component_bytes: 1000, ..Limits::default() }, ..RuntimeConfig::default() }).unwrap();
    let e = small.load(lathe_sandbox::builtin("exact-match").unwrap()).unwrap_err();
    assert!(matches!(e, LoadError::TooLarge { limit: 1000, .. }), "{e:?}");
    good_still_works(&rt);
}

/// Each world has its own limits: a scorer may be held to less (or given more) than a
/// validator, and every error names the world whose limit it hit.
#[test]
fn limits_are_per_world_and_errors_name_the_world() {
    let exact = lathe_sandbox::builtin("exact-match").unwrap();
    let tight = Limits { max_component_bytes: exact.len() - 1, memory_bytes: 8 << 20, timeout: Duration::from_millis(200), ..Limits::default() };
    let rt = Runtime::new(RuntimeConfig { worlds: [(Kind::Scorer, tight)].into(), ..RuntimeConfig::default() }).unwrap();
    // A scorer one byte over its world's cap is refused after its world is known…
    let e = rt.load(exact).unwrap_err();
    assert!(matches!(e, LoadError::ComponentTooLarge { kind: Kind::Scorer, .. }), "{e:?}");
    assert!(e.to_string().contains("for scorer plugins"), "{e}");
    // …while a validator, under the default limits, loads.
    assert_eq!(rt.load(lathe_sandbox::builtin("json-schema").unwrap()).unwrap().kind(), Kind::Validator);

    let roomy = Limits { memory_bytes: 8 << 20, timeout: Duration::from_millis(200), ..Limits::default() };
    let rt = Runtime::new(RuntimeConfig { worlds: [(Kind::Scorer, roomy)].into(), ..RuntimeConfig::default() }).unwrap();
    let e = rt.load(&hostile_bytes("memory-bomb")).unwrap().instance("{}").unwrap().score("x", "y").unwrap_err();
    assert!(matches!(e, CallError::MemoryExhausted { limit_bytes, set_by: LimitSetBy::Host(Kind::Scorer), .. } if limit_bytes == 8 << 20), "{e:?}");
    assert!(e.to_string().contains("the host's limit for scorer plugins"), "{e}");
    let e = rt.load(&hostile_bytes("infinite-loop")).unwrap().instance("{}").unwrap().score("x", "y").unwrap_err();
    assert!(e.to_string().contains("200ms time limit (the host's limit for scorer plugins)"), "{e}");
    // A plugin held below its world's limit says it hit its own.
    let held = rt.load(&hostile_bytes("infinite-loop")).unwrap().with_limits(1 << 30, Duration::from_millis(100));
    let e = held.instance("{}").unwrap().score("x", "y").unwrap_err();
    assert!(matches!(e, CallError::Timeout { set_by: LimitSetBy::Request, .. }), "{e:?}");
    assert_eq!(held.limits().memory_bytes, 8 << 20, "memory stays the world's");
}

#[test]
fn fuel_meters_deterministically() {
    let rt = Runtime::new(RuntimeConfig {
        fuel: true,
        limits: Limits { fuel: Some(5_000_000), timeout: Duration::from_secs(30), ..Limits::default() },
        ..RuntimeConfig::default()
    })
    .unwrap();
    let mut inst = rt.load(&hostile_bytes("infinite-loop")).unwrap().instance("{}").unwrap();
    let e = inst.score("x", "y").unwrap_err();
    assert!(matches!(e, CallError::OutOfFuel { fuel: 5_000_000, .. }), "{e:?}");
    // Fuel is re-armed per call: ordinary work still fits.
    let mut em = rt.load(lathe_sandbox::builtin("exact-match").unwrap()).unwrap().instance("{}").unwrap();
    for _ in 0..100 {
        assert_eq!(em.score("a", "a").unwrap().value, 1.0);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_running_plugin_never_blocks_the_async_executor() {
    // One executor thread: if the plugin ran on it, the ticker could not tick until the
    // plugin's 1 s deadline. Through the blocking pool the ticker finishes first.
    let rt = strict_runtime(Duration::from_secs(1));
    let plugin = rt.load(&hostile_bytes("infinite-loop")).unwrap();
    let call = async {
        let r = plugin.call_blocking("{}", |inst| inst.score("x", "y")).await;
        (r, std::time::Instant::now())
    };
    let ticker = async {
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::time::Instant::now()
    };
    let ((result, plugin_done), ticker_done) = tokio::join!(call, ticker);
    assert!(matches!(result, Err(CallError::Timeout { .. })), "{result:?}");
    assert!(ticker_done < plugin_done, "the executor was blocked while the plugin ran");
    let good = builtin(&rt, "exact-match");
    let s = good.call_blocking("{}", |inst| inst.score("a", "a")).await.unwrap();
    assert_eq!(s.value, 1.0);
}
