// fetcher gallery: more tiles on scroll, filters that apply themselves, keyboard steps.
// Everything drawn here is built with the DOM and textContent: archive text is never HTML.
"use strict";

const LIST_KEY = "fetcher.gallery.list"; // the grid's order, for the arrows on a task page
const FROM_GRID_KEY = "fetcher.gallery.fromGrid";

function readList() {
  try {
    return JSON.parse(sessionStorage.getItem(LIST_KEY)) || null;
  } catch (_) {
    return null;
  }
}

function saveList(list) {
  try {
    sessionStorage.setItem(LIST_KEY, JSON.stringify(list));
  } catch (_) {
    // storage full or refused: the arrows just stop at what is known
  }
}

async function fetchCards(filters, after) {
  const params = new URLSearchParams(filters);
  params.set("after", after);
  const answer = await fetch("/api/cards?" + params.toString(), { credentials: "same-origin" });
  if (!answer.ok) throw new Error("cards: HTTP " + answer.status);
  return answer.json();
}

function typing(event) {
  const target = event.target;
  return (
    event.altKey || event.ctrlKey || event.metaKey ||
    (target && /^(INPUT|SELECT|TEXTAREA|VIDEO|AUDIO)$/.test(target.tagName))
  );
}

// -- the grid ---------------------------------------------------------------------------

function tile(card) {
  const item = document.createElement("li");
  item.className = "card state-" + card.state;
  const link = document.createElement("a");
  link.href = card.href;
  link.dataset.task = card.task_id;
  if (card.cover === null) {
    const placeholder = document.createElement("span");
    placeholder.className = "placeholder";
    placeholder.textContent = card.state;
    link.append(placeholder);
  } else if (card.cover.kind === "image") {
    const image = document.createElement("img");
    image.src = card.cover.src;
    image.alt = "";
    image.loading = "lazy";
    link.append(image);
  } else {
    const video = document.createElement("video");
    video.src = card.cover.src + "#t=0.1";
    video.preload = "metadata";
    video.muted = true;
    video.playsInline = true;
    link.append(video);
  }
  const caption = document.createElement("span");
  caption.className = "caption";
  const prompt = document.createElement("span");
  prompt.className = "prompt";
  prompt.textContent = card.prompt || card.task_id;
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = [card.model, (card.created_at || "").slice(0, 10), card.state]
    .filter(Boolean)
    .join(" · ");
  caption.append(prompt, meta);
  link.append(caption);
  item.append(link);
  return item;
}

function gridIds(grid) {
  return Array.from(grid.querySelectorAll("a[data-task]"), (a) => a.dataset.task);
}

function setUpGrid(grid) {
  const filters = grid.dataset.filters;
  const more = document.getElementById("more");
  let loading = false;

  const remember = () =>
    saveList({ filters: filters, ids: gridIds(grid), next: grid.dataset.next || null });
  remember();
  sessionStorage.removeItem(FROM_GRID_KEY);

  async function loadMore() {
    if (loading || !grid.dataset.next) return;
    loading = true;
    try {
      const page = await fetchCards(filters, grid.dataset.next);
      page.cards.forEach((card) => grid.append(tile(card)));
      grid.dataset.next = page.next || "";
      remember();
      if (!page.next && more) more.remove();
    } finally {
      loading = false;
    }
  }

  if (more && "IntersectionObserver" in window) {
    const watcher = new IntersectionObserver(
      (entries) => {
        if (entries.some((entry) => entry.isIntersecting)) {
          loadMore().then(() => {
            // still in view (a tall screen): keep going until it is pushed out
            const box = more.getBoundingClientRect();
            if (more.isConnected && box.top < window.innerHeight) loadMore();
          });
        }
      },
      { rootMargin: "600px 0px" }
    );
    watcher.observe(more);
    more.querySelector("a").addEventListener("click", (event) => {
      event.preventDefault();
      loadMore();
    });
  }

  grid.addEventListener("click", (event) => {
    if (event.target.closest("a[data-task]")) sessionStorage.setItem(FROM_GRID_KEY, "1");
  });

  // a thumbnail that cannot be made becomes a plain tile
  grid.addEventListener(
    "error",
    (event) => {
      const broken = event.target;
      if (broken.tagName !== "IMG") return;
      const placeholder = document.createElement("span");
      placeholder.className = "placeholder";
      placeholder.textContent = "no preview";
      broken.replaceWith(placeholder);
    },
    true
  );

  const form = document.getElementById("filters");
  if (form) {
    form.querySelectorAll("select, input[type=date]").forEach((field) =>
      field.addEventListener("change", () => form.requestSubmit())
    );
    // empty fields stay out of the address
    form.addEventListener("formdata", (event) => {
      for (const [name, value] of Array.from(event.formData.entries())) {
        if (value === "") event.formData.delete(name);
      }
    });
  }

  document.addEventListener("keydown", (event) => {
    if (typing(event)) return;
    const links = Array.from(grid.querySelectorAll("a[data-task]"));
    if (!links.length) return;
    const at = links.indexOf(document.activeElement);
    let to = null;
    if (event.key === "ArrowRight") to = at + 1;
    else if (event.key === "ArrowLeft") to = Math.max(at - 1, 0);
    else if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      const width = links[0].getBoundingClientRect().width || 1;
      const across = Math.max(1, Math.round(grid.getBoundingClientRect().width / width));
      to = at < 0 ? 0 : at + (event.key === "ArrowDown" ? across : -across);
    } else if (event.key === "Escape" && at >= 0) {
      document.activeElement.blur();
      return;
    } else return;
    event.preventDefault();
    to = Math.min(Math.max(to, 0), links.length - 1);
    links[to].focus();
    if (to >= links.length - 4) loadMore();
  });
}

// -- a task's page ----------------------------------------------------------------------

async function neighbours(task) {
  const list = readList();
  if (!list || list.filters !== task.dataset.filters) return null;
  let at = list.ids.indexOf(task.dataset.task);
  if (at < 0) return null;
  if (at === list.ids.length - 1 && list.next) {
    try {
      const page = await fetchCards(list.filters, list.next);
      list.ids.push(...page.cards.map((card) => card.task_id));
      list.next = page.next || null;
      saveList(list);
    } catch (_) {
      // the next step just is not offered
    }
  }
  const suffix = list.filters ? "?" + list.filters : "";
  const href = (id) => "/task/" + encodeURIComponent(id) + suffix;
  return {
    prev: at > 0 ? href(list.ids[at - 1]) : null,
    next: at + 1 < list.ids.length ? href(list.ids[at + 1]) : null,
  };
}

function setUpTask(task) {
  const back = document.getElementById("back");
  const links = { prev: document.getElementById("prev"), next: document.getElementById("next") };
  // the grid's own list when the page was opened from it; else the server's neighbours
  const served = {};
  for (const side of ["prev", "next"]) {
    served[side] = links[side].hidden ? null : links[side].getAttribute("href");
  }
  const found = neighbours(task).then((listed) => {
    const near = {};
    for (const side of ["prev", "next"]) {
      near[side] = (listed && listed[side]) || served[side];
      if (near[side]) {
        links[side].href = near[side];
        links[side].hidden = false;
      }
    }
    return near;
  });
  const step = (side) =>
    found.then((near) => {
      // replace, not push: Esc (history back) then returns to the grid in one step
      if (near && near[side]) location.replace(near[side]);
    });
  for (const side of ["prev", "next"]) {
    links[side].addEventListener("click", (event) => {
      event.preventDefault();
      step(side);
    });
  }
  document.addEventListener("keydown", (event) => {
    if (typing(event)) return;
    if (event.key === "ArrowRight") step("next");
    else if (event.key === "ArrowLeft") step("prev");
    else if (event.key === "Escape") {
      if (sessionStorage.getItem(FROM_GRID_KEY) && history.length > 1) {
        sessionStorage.removeItem(FROM_GRID_KEY);
        history.back();
      } else location.assign(back.href);
    } else return;
    event.preventDefault();
  });
}

const grid = document.getElementById("grid");
if (grid) setUpGrid(grid);
const task = document.querySelector("main.task");
if (task) setUpTask(task);
